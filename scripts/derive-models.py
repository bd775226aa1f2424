#!/usr/bin/env python3
"""Derive a Hugging Face directory and an ONNX export from a real llama GGUF.

Usage: derive-models.py GGUF OUTDIR [--verify]

Why this exists: modeld serves the same model through several runtimes, and the
tests need a real network in more than one format to prove that they agree. No
package we can install ships a small LLM as safetensors or ONNX, but one does ship
SmolLM2-135M-Instruct as a GGUF (see scripts/fetch-test-assets). So this script
dequantizes that GGUF and writes the *same* network twice:

    OUTDIR/hf/    Hugging Face layout (MLX reads the same): model.safetensors (F32),
                  config.json, generation_config.json, tokenizer.json,
                  tokenizer_config.json
    OUTDIR/onnx/  an Optimum / onnxruntime-genai style decoder: model.onnx with its
                  weights in model.onnx.data, genai_config.json, and the same
                  config and tokenizer files
    OUTDIR/mlx/   hf/ quantized by MLX (mlx-lm's converter on the mlx-cpu wheel):
                  4-bit affine groups of 32, bfloat16 scales and biases
    OUTDIR/tflite/  a TFLite decoder, model.tflite, written with the TFLite schema
                  (from the ai-edge-litert wheel; no converter, no TensorFlow):
                  float32 weights, signatures `prefill_8`, `prefill_32` (blocks of
                  8 and 32 tokens) and `decode` (1),
                  a fixed 1024-position KV cache passed in and out
    OUTDIR/litertlm/  tflite/ as a LiteRT-LM bundle, model.litertlm (litert-lm-builder,
                  offline), with the tokenizer and config files beside it

Both hold the GGUF's dequantized weights exactly, so their outputs should match each
other closely and llama.cpp's on the quantized file nearly (compare greedy tokens).
`--verify` checks this: a numpy forward pass over hf/ against ONNX Runtime over
onnx/, the KV-cache path against full recomputation, and (with the `tokenizers`
package installed) a greedy chat answer.

Only llama-architecture GGUFs with a byte-level BPE ("gpt2") vocabulary are
handled; anything else is refused rather than converted approximately.

The output is deterministic: the same GGUF and package versions give the same bytes.
Everything is written to a scratch directory next to OUTDIR and renamed into place
at the end, so an interrupted run never leaves a half-written OUTDIR. An existing
OUTDIR is replaced.

Needs numpy, gguf, onnx, safetensors, mlx-lm (with mlx[cpu] on Linux), ai-edge-litert
and litert-lm-builder; --verify also needs onnxruntime and jinja2, and uses tokenizers when it
is installed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PRODUCER = "modeld scripts/derive-models.py"
OPSET = 17  # standard ONNX ops only; loadable by any ONNX Runtime since 1.13
IR_VERSION = 8

# llama.cpp's token types (llama_token_type).
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4

# Pre-tokenizers, mirroring server/tokenizer/src/gguf.rs (which mirrors llama.cpp's
# llama-vocab.cpp), so the tokenizer.json written here is the one the agent builds
# in memory from the same GGUF.
LLAMA3_REGEX = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_REGEX = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_SPLITS = {
    **dict.fromkeys(["gpt-2", "mpt", "olmo", "jais", "trillion"], "gpt2"),
    **dict.fromkeys(
        ["starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva"],
        "digits-then-gpt2",
    ),
    **dict.fromkeys(["llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral"], "llama3"),
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen", "hunyuan"], "qwen2"),
}


def fail(message: str) -> None:
    sys.exit(f"derive-models: {message}")


# --------------------------------------------------------------------------- GGUF

class Gguf:
    """The metadata and dequantized (F32) tensors of a GGUF file."""

    def __init__(self, path: Path):
        from gguf import GGUFReader

        self.path = path
        self.reader = GGUFReader(str(path), "r")
        self.meta = dict(self.reader.fields)

    def get(self, key: str, default=None):
        field = self.meta.get(key)
        return default if field is None else field.contents()

    def require(self, key: str):
        value = self.get(key)
        if value is None:
            fail(f"{self.path}: metadata {key} is missing")
        return value

    def tensors(self) -> dict[str, np.ndarray]:
        """Every tensor as float32 in numpy order.

        GGUF lists dimensions innermost first (ne0 = row length), numpy outermost
        first, so a weight GGUF calls [n_in, n_out] comes back as (n_out, n_in),
        which is already the [out_features, in_features] layout Hugging Face uses.
        """
        from gguf.quants import dequantize

        out = {}
        for t in self.reader.tensors:
            array = dequantize(t.data, t.tensor_type)
            expected = tuple(int(d) for d in reversed(t.shape))
            if array.shape != expected:
                fail(f"{t.name}: dequantized to {array.shape}, expected {expected}")
            out[t.name] = np.ascontiguousarray(array, dtype=np.float32)
        return out


def f32_number(value: float) -> float:
    """The shortest decimal that reads back as the same float32 (1e-05, not
    9.999999747378752e-06), as the original config.json wrote it."""
    return float(str(np.float32(value)))


def hyperparameters(g: Gguf) -> dict:
    arch = g.require("general.architecture")
    if arch != "llama":
        fail(f"architecture {arch!r} is not supported (only llama)")
    n_head = int(g.require("llama.attention.head_count"))
    hidden = int(g.require("llama.embedding_length"))
    head_dim = int(g.get("llama.attention.key_length", hidden // n_head))
    rope_dim = int(g.get("llama.rope.dimension_count", head_dim))
    if rope_dim != head_dim or head_dim * n_head != hidden:
        fail(f"head_dim {head_dim}, rope dims {rope_dim}, hidden {hidden}: only full-width RoPE "
             "with hidden = heads * head_dim is supported")
    for key in g.meta:
        if key.startswith("llama.rope.scaling"):
            fail(f"{key} is set: RoPE scaling is not supported")
    tokens = g.require("tokenizer.ggml.tokens")
    return {
        "n_layer": int(g.require("llama.block_count")),
        "hidden": hidden,
        "intermediate": int(g.require("llama.feed_forward_length")),
        "n_head": n_head,
        "n_kv_head": int(g.get("llama.attention.head_count_kv", n_head)),
        "head_dim": head_dim,
        "vocab": int(g.get("llama.vocab_size", len(tokens))),
        "context": int(g.require("llama.context_length")),
        "rope_theta": float(np.float32(g.get("llama.rope.freq_base", 10000.0))),
        "rms_eps": float(np.float32(g.require("llama.attention.layer_norm_rms_epsilon"))),
    }


def unpermute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation.

    llama.cpp rotates adjacent pairs (x0, x1), Hugging Face rotates the two halves
    of each head (rotate_half), so the converter reorders each head's rows with
    reshape(n_head, 2, d/2, ...).swapaxes(1, 2). Reversing it gives weights for
    HF's convention."""
    rows = w.shape[0]
    return np.ascontiguousarray(
        w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def hf_state_dict(tensors: dict[str, np.ndarray], hp: dict) -> dict[str, np.ndarray]:
    """GGUF tensor names to Hugging Face llama names; refuses tensors it does not know."""
    per_layer = {
        "attn_norm.weight": "input_layernorm.weight",
        "attn_q.weight": "self_attn.q_proj.weight",
        "attn_k.weight": "self_attn.k_proj.weight",
        "attn_v.weight": "self_attn.v_proj.weight",
        "attn_output.weight": "self_attn.o_proj.weight",
        "ffn_norm.weight": "post_attention_layernorm.weight",
        "ffn_gate.weight": "mlp.gate_proj.weight",
        "ffn_up.weight": "mlp.up_proj.weight",
        "ffn_down.weight": "mlp.down_proj.weight",
    }
    out = {}
    for name, w in tensors.items():
        if name == "token_embd.weight":
            out["model.embed_tokens.weight"] = w
        elif name == "output_norm.weight":
            out["model.norm.weight"] = w
        elif name == "output.weight":
            out["lm_head.weight"] = w
        elif name.startswith("blk."):
            _, layer, rest = name.split(".", 2)
            if rest not in per_layer:
                fail(f"unexpected tensor {name}")
            if rest == "attn_q.weight":
                w = unpermute_rope(w, hp["n_head"])
            elif rest == "attn_k.weight":
                w = unpermute_rope(w, hp["n_kv_head"])
            out[f"model.layers.{int(layer)}.{per_layer[rest]}"] = w
        else:
            fail(f"unexpected tensor {name}")
    expected = 2 + 9 * hp["n_layer"] + ("lm_head.weight" in out)
    if len(out) != expected:
        fail(f"{len(out)} tensors, expected {expected}")
    embed = out["model.embed_tokens.weight"].shape
    if embed != (hp["vocab"], hp["hidden"]):
        fail(f"token embedding is {embed}, expected ({hp['vocab']}, {hp['hidden']})")
    return out


# --------------------------------------------------------------------------- tokenizer

def special_ids(g: Gguf, n_vocab: int) -> dict:
    def token_id(key):
        value = g.get(key)
        return int(value) if value is not None and 0 <= int(value) < n_vocab else None

    return {
        "bos": token_id("tokenizer.ggml.bos_token_id"),
        "eos": token_id("tokenizer.ggml.eos_token_id"),
        "pad": token_id("tokenizer.ggml.padding_token_id"),
        "unk": token_id("tokenizer.ggml.unknown_token_id"),
        # llama.cpp's defaults for a BPE vocabulary: no BOS, no EOS unless stated.
        "add_bos": bool(g.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos": bool(g.get("tokenizer.ggml.add_eos_token", False)),
    }


def tokenizer_json(g: Gguf) -> tuple[str, list[dict]]:
    """tokenizer.json for the GGUF's vocabulary, and its added tokens.

    Built to the recipe of server/tokenizer/src/gguf.rs, and serialized the way the
    `tokenizers` library serializes that tokenizer (compact, keys in its order), so
    the file is what HfTokenizer::to_json would write for the same GGUF."""
    model = g.require("tokenizer.ggml.model")
    if model != "gpt2":
        fail(f"tokenizer model {model!r} is not supported (only byte-level BPE, \"gpt2\")")
    pre_name = g.get("tokenizer.ggml.pre", "default")
    split = PRE_SPLITS.get(pre_name)
    if split is None:
        fail(f"pre-tokenizer {pre_name!r} is not supported")
    tokens = list(g.require("tokenizer.ggml.tokens"))
    merges = list(g.require("tokenizer.ggml.merges"))
    types = list(g.get("tokenizer.ggml.token_type", []))
    if types and len(types) != len(tokens):
        fail(f"{len(types)} token types for {len(tokens)} tokens")

    def byte_level(use_regex: bool) -> dict:
        return {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                "use_regex": use_regex}

    def regex_split(regex: str) -> dict:
        return {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated",
                "invert": False}

    if split == "gpt2":
        pre = byte_level(True)
    elif split == "digits-then-gpt2":
        pre = {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True}, byte_level(True)]}
    else:
        regex = LLAMA3_REGEX if split == "llama3" else QWEN2_REGEX
        pre = {"type": "Sequence", "pretokenizers": [regex_split(regex), byte_level(False)]}

    # Control tokens are special (matched only when parsing special tokens, as in
    # llama.cpp); user-defined ones are ordinary added tokens, always matched.
    added = []
    for i, (token, ty) in enumerate(zip(tokens, types)):
        if ty in (TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED):
            special = ty == TOKEN_TYPE_CONTROL
            added.append({"id": i, "content": token, "single_word": False, "lstrip": False,
                          "rstrip": False, "normalized": not special, "special": special})

    pairs = []
    for m in merges:
        a, sep, b = m.partition(" ")
        if not sep:
            fail(f"merge {m!r} is not two tokens")
        pairs.append([a, b])

    doc = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": pre,
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                    "use_regex": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            # Llama 3 vocabularies take whole-word hits before merging.
            "ignore_merges": split == "llama3",
            "vocab": {t: i for i, t in enumerate(tokens)},
            "merges": pairs,
        },
    }
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":")), added


# --------------------------------------------------------------------------- hf/

def json_text(obj) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False) + "\n"


def write_hf(out: Path, g: Gguf, hp: dict, weights: dict[str, np.ndarray]) -> None:
    from safetensors.numpy import save_file

    out.mkdir(parents=True)
    tied = "lm_head.weight" not in weights
    # "pt" is what transformers writes; MLX weights would say "mlx".
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})

    tokens = g.require("tokenizer.ggml.tokens")
    sp = special_ids(g, len(tokens))
    config = {
        "_name_or_path": g.get("general.name", ""),
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": sp["bos"],
        "eos_token_id": sp["eos"],
        "pad_token_id": sp["pad"],
        "head_dim": hp["head_dim"],
        "hidden_act": "silu",
        "hidden_size": hp["hidden"],
        "intermediate_size": hp["intermediate"],
        "max_position_embeddings": hp["context"],
        "mlp_bias": False,
        "num_attention_heads": hp["n_head"],
        "num_hidden_layers": hp["n_layer"],
        "num_key_value_heads": hp["n_kv_head"],
        "pretraining_tp": 1,
        "rms_norm_eps": f32_number(hp["rms_eps"]),
        "rope_scaling": None,
        "rope_theta": f32_number(hp["rope_theta"]),
        "tie_word_embeddings": tied,
        "torch_dtype": "float32",
        "use_cache": True,
        "vocab_size": hp["vocab"],
    }
    (out / "config.json").write_text(json_text(config), encoding="utf-8")
    generation = {"bos_token_id": sp["bos"], "eos_token_id": sp["eos"],
                  "pad_token_id": sp["pad"], "do_sample": False}
    (out / "generation_config.json").write_text(json_text(generation), encoding="utf-8")

    text, added = tokenizer_json(g)
    (out / "tokenizer.json").write_text(text, encoding="utf-8")

    def token_text(i):
        return None if i is None else tokens[i]

    # What server/tokenizer/src/json.rs reads: the token texts, add_bos/add_eos,
    # chat_template and model_max_length.
    tok_config = {
        "add_bos_token": sp["add_bos"],
        "add_eos_token": sp["add_eos"],
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(t["id"]): {k: t[k] for k in
                           ("content", "lstrip", "normalized", "rstrip", "single_word", "special")}
            for t in added
        },
        "bos_token": token_text(sp["bos"]),
        "chat_template": g.get("tokenizer.chat_template"),
        "clean_up_tokenization_spaces": False,
        "eos_token": token_text(sp["eos"]),
        "model_max_length": hp["context"],
        "pad_token": token_text(sp["pad"]),
        "tokenizer_class": "GPT2Tokenizer",
        "unk_token": token_text(sp["unk"]),
    }
    tok_config = {k: v for k, v in tok_config.items() if v is not None}
    (out / "tokenizer_config.json").write_text(json_text(tok_config), encoding="utf-8")


# --------------------------------------------------------------------------- onnx/

def rope_inv_freq(head_dim: int, theta: float) -> np.ndarray:
    """Hugging Face's default RoPE frequencies, computed in float32 as it does."""
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    return (np.float32(1.0) / (np.float32(theta) ** exponents)).astype(np.float32)


class GraphBuilder:
    """Collects nodes and initializers; names nodes "/scope/Op_n" like exporters do."""

    def __init__(self):
        from onnx import numpy_helper

        self._from_array = numpy_helper.from_array
        self.nodes = []
        self.initializers = []
        self._consts = {}
        self._counts = {}

    def weight(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(self._from_array(np.ascontiguousarray(array), name))
        return name

    def const(self, values, dtype) -> str:
        """A small shared constant (shape vectors, scalars)."""
        array = np.array(values, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._consts:
            self._consts[key] = self.weight(f"/const_{len(self._consts)}", array)
        return self._consts[key]

    def op(self, op_type: str, inputs: list[str], scope: str = "", outputs=None, n_out=1, **attrs):
        from onnx import helper

        base = f"{scope}/{op_type}"
        n = self._counts.get(base, 0)
        self._counts[base] = n + 1
        name = base if n == 0 else f"{base}_{n}"
        if outputs is None:
            outputs = [f"{name}_output_{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=name, **attrs))
        return outputs[0] if len(outputs) == 1 else outputs


def build_onnx(hp: dict, weights: dict[str, np.ndarray]):
    """The decoder graph, Optimum's layout and names; returns an onnx.ModelProto.

    Keys are stored in the cache after RoPE (as Optimum exports do), so a decode
    step only rotates its new keys. Causal masking uses absolute positions (query
    p sees keys 0..=p, p counted from the past length), so one graph serves prefill,
    decode and chunked prefill; attention_mask zeros (padding) are masked too.
    """
    from onnx import TensorProto, helper

    H, KV, D = hp["n_head"], hp["n_kv_head"], hp["head_dim"]
    hidden, V = hp["hidden"], hp["vocab"]
    n_rep = H // KV
    g = GraphBuilder()
    i64, f32 = np.int64, np.float32

    embed = g.weight("model.embed_tokens.weight", weights["model.embed_tokens.weight"])

    # ONNX MatMul wants [in, out]: HF's [out, in] weights are stored transposed.
    def linear_weight(name):
        return g.weight(f"{name}.T", weights[name].T)

    def rms_norm(x, weight_name, scope):
        # The Pow/ReduceMean/Add/Sqrt/Div/Mul chain ORT fuses into one kernel.
        w = g.weight(weight_name, weights[weight_name])
        sq = g.op("Pow", [x, g.const(2.0, f32)], scope)
        var = g.op("ReduceMean", [sq], scope, axes=[-1], keepdims=1)
        std = g.op("Sqrt", [g.op("Add", [var, g.const(hp["rms_eps"], f32)], scope)], scope)
        return g.op("Mul", [g.op("Div", [x, std], scope), w], scope)

    # Shared by all layers: positions, RoPE tables, the attention bias.
    scope = "/model"
    ids_shape = g.op("Shape", ["input_ids"], scope)
    seq_len = g.op("Gather", [ids_shape, g.const(1, i64)], scope, axis=0)
    past_len = g.op("Gather", [g.op("Shape", ["past_key_values.0.key"], scope),
                               g.const(2, i64)], scope, axis=0)
    total_len = g.op("Add", [past_len, seq_len], scope)
    key_pos = g.op("Range", [g.const(0, i64), total_len, g.const(1, i64)], scope)
    query_pos = g.op("Range", [past_len, total_len, g.const(1, i64)], scope)
    causal = g.op("LessOrEqual", [g.op("Unsqueeze", [key_pos, g.const([0], i64)], scope),
                                  g.op("Unsqueeze", [query_pos, g.const([1], i64)], scope)],
                  scope)  # [S, T]
    not_pad = g.op("Unsqueeze", [g.op("Cast", ["attention_mask"], scope, to=TensorProto.BOOL),
                                 g.const([1, 2], i64)], scope)  # [B, 1, 1, T]
    allowed = g.op("And", [causal, not_pad], scope)  # [B, 1, S, T]
    # The most negative float rather than -inf: a fully masked row (a padding query)
    # then gets a uniform softmax instead of NaN.
    attn_bias = g.op("Where", [allowed, g.const(0.0, f32),
                               g.const(np.finfo(np.float32).min, f32)], scope)

    inv_freq = g.weight("model.rotary_emb.inv_freq", rope_inv_freq(D, hp["rope_theta"]))
    pos = g.op("Unsqueeze", [g.op("Cast", ["position_ids"], scope, to=TensorProto.FLOAT),
                             g.const([2], i64)], scope)  # [B, S, 1]
    freqs = g.op("Mul", [pos, inv_freq], scope)  # [B, S, D/2]
    angles = g.op("Concat", [freqs, freqs], scope, axis=-1)  # [B, S, D]
    cos = g.op("Unsqueeze", [g.op("Cos", [angles], scope), g.const([1], i64)], scope)
    sin = g.op("Unsqueeze", [g.op("Sin", [angles], scope), g.const([1], i64)], scope)

    def apply_rope(x, scope):
        # HF's rotate_half: (x1, x2) -> (-x2, x1) over the two halves of each head.
        x1, x2 = g.op("Split", [x, g.const([D // 2, D // 2], i64)], scope, n_out=2, axis=-1)
        rotated = g.op("Concat", [g.op("Neg", [x2], scope), x1], scope, axis=-1)
        return g.op("Add", [g.op("Mul", [x, cos], scope), g.op("Mul", [rotated, sin], scope)],
                    scope)

    def heads(x, n, scope):  # [B, S, n*D] -> [B, n, S, D]
        x = g.op("Reshape", [x, g.const([0, 0, n, D], i64)], scope)
        return g.op("Transpose", [x], scope, perm=[0, 2, 1, 3])

    def repeat_kv(x, scope):  # [B, KV, T, D] -> [B, H, T, D]; head h reads KV head h // n_rep
        if n_rep == 1:
            return x
        x = g.op("Unsqueeze", [x, g.const([2], i64)], scope)
        x = g.op("Expand", [x, g.const([1, 1, n_rep, 1, 1], i64)], scope)
        return g.op("Reshape", [x, g.const([0, H, -1, D], i64)], scope)

    x = g.op("Gather", [embed, "input_ids"], "/model/embed_tokens", axis=0)
    for layer in range(hp["n_layer"]):
        p = f"model.layers.{layer}"
        scope = f"/model/layers.{layer}/self_attn"
        h = rms_norm(x, f"{p}.input_layernorm.weight", f"/model/layers.{layer}/input_layernorm")
        q = heads(g.op("MatMul", [h, linear_weight(f"{p}.self_attn.q_proj.weight")], scope), H, scope)
        k = heads(g.op("MatMul", [h, linear_weight(f"{p}.self_attn.k_proj.weight")], scope), KV, scope)
        v = heads(g.op("MatMul", [h, linear_weight(f"{p}.self_attn.v_proj.weight")], scope), KV, scope)
        q, k = apply_rope(q, scope), apply_rope(k, scope)
        keys = g.op("Concat", [f"past_key_values.{layer}.key", k], scope, axis=2,
                    outputs=[f"present.{layer}.key"])
        values = g.op("Concat", [f"past_key_values.{layer}.value", v], scope, axis=2,
                      outputs=[f"present.{layer}.value"])
        keys_t = g.op("Transpose", [repeat_kv(keys, scope)], scope, perm=[0, 1, 3, 2])
        scores = g.op("Mul", [g.op("MatMul", [q, keys_t], scope), g.const(1.0 / math.sqrt(D), f32)],
                      scope)
        probs = g.op("Softmax", [g.op("Add", [scores, attn_bias], scope)], scope, axis=-1)
        ctx = g.op("Transpose", [g.op("MatMul", [probs, repeat_kv(values, scope)], scope)],
                   scope, perm=[0, 2, 1, 3])
        ctx = g.op("Reshape", [ctx, g.const([0, 0, H * D], i64)], scope)
        attn = g.op("MatMul", [ctx, linear_weight(f"{p}.self_attn.o_proj.weight")], scope)
        x = g.op("Add", [x, attn], f"/model/layers.{layer}")

        scope = f"/model/layers.{layer}/mlp"
        h = rms_norm(x, f"{p}.post_attention_layernorm.weight",
                     f"/model/layers.{layer}/post_attention_layernorm")
        gate = g.op("MatMul", [h, linear_weight(f"{p}.mlp.gate_proj.weight")], scope)
        up = g.op("MatMul", [h, linear_weight(f"{p}.mlp.up_proj.weight")], scope)
        act = g.op("Mul", [gate, g.op("Sigmoid", [gate], scope)], scope)  # SiLU
        down = g.op("MatMul", [g.op("Mul", [act, up], scope),
                               linear_weight(f"{p}.mlp.down_proj.weight")], scope)
        x = g.op("Add", [x, down], f"/model/layers.{layer}")

    x = rms_norm(x, "model.norm.weight", "/model/norm")
    # Gemm with transB reads the [vocab, hidden] embedding as the LM head in place,
    # so tied weights are stored once.
    head = embed if "lm_head.weight" not in weights else g.weight("lm_head.weight",
                                                                  weights["lm_head.weight"])
    flat = g.op("Reshape", [x, g.const([-1, hidden], i64)], "/lm_head")
    logits = g.op("Gemm", [flat, head], "/lm_head", transB=1)
    out_shape = g.op("Concat", [ids_shape, g.const([V], i64)], "/lm_head", axis=0)
    g.op("Reshape", [logits, out_shape], "/lm_head", outputs=["logits"])

    def value(name, elem, dims):
        return helper.make_tensor_value_info(name, elem, dims)

    inputs = [
        value("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
        value("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"]),
        value("position_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
    ]
    outputs = [value("logits", TensorProto.FLOAT, ["batch_size", "sequence_length", V])]
    for layer in range(hp["n_layer"]):
        for kind in ("key", "value"):
            inputs.append(value(f"past_key_values.{layer}.{kind}", TensorProto.FLOAT,
                                ["batch_size", KV, "past_sequence_length", D]))
            outputs.append(value(f"present.{layer}.{kind}", TensorProto.FLOAT,
                                 ["batch_size", KV, "total_sequence_length", D]))
    graph = helper.make_graph(g.nodes, "main_graph", inputs, outputs, initializer=g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name=PRODUCER, ir_version=IR_VERSION)
    model.doc_string = "llama decoder with KV cache (Optimum / onnxruntime-genai I/O names)"
    return model


def write_onnx(out: Path, hf_dir: Path, g: Gguf, hp: dict, weights: dict[str, np.ndarray]) -> None:
    import onnx

    out.mkdir(parents=True)
    model = build_onnx(hp, weights)
    # Weights in one side file, as real exports of models this size ship them;
    # model.onnx itself stays small.
    onnx.save_model(model, str(out / "model.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="model.onnx.data",
                    size_threshold=1024)
    del model
    onnx.checker.check_model(str(out / "model.onnx"))

    sp = special_ids(g, len(g.require("tokenizer.ggml.tokens")))
    genai = {
        "model": {
            "bos_token_id": sp["bos"],
            "context_length": hp["context"],
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": "model.onnx",
                "head_size": hp["head_dim"],
                "hidden_size": hp["hidden"],
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "position_ids": "position_ids",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
                "num_attention_heads": hp["n_head"],
                "num_hidden_layers": hp["n_layer"],
                "num_key_value_heads": hp["n_kv_head"],
            },
            "eos_token_id": sp["eos"],
            "pad_token_id": sp["pad"],
            "type": "llama",
            "vocab_size": hp["vocab"],
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": False,
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": hp["context"],
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            # present = concat(past, new): the cache grows, it is not a shared buffer.
            "past_present_share_buffer": False,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }
    (out / "genai_config.json").write_text(json_text(genai), encoding="utf-8")
    # onnxruntime-genai and Optimum model folders carry the tokenizer and configs.
    for name in ("config.json", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json"):
        shutil.copyfile(hf_dir / name, out / name)


# --------------------------------------------------------------------------- tflite

# The TFLite decoder's fixed shapes: LiteRT compiles a graph for static shapes, so the
# KV cache is a fixed window of TFLITE_CONTEXT positions, updated in place, and a
# prompt goes through prefill signatures, TFLITE_PREFILL tokens at a time (padded).
TFLITE_CONTEXT = 1024
TFLITE_PREFILL = 32
# Prefill blocks, one signature each: a short prompt pads to the smallest that holds it.
TFLITE_PREFILL_BLOCKS = (8, TFLITE_PREFILL)


class TfliteGraph:
    """One subgraph of a .tflite model, written with the TFLite schema's object API
    (schema_py_generated, shipped in the ai-edge-litert wheel). Weight buffers are
    shared by the subgraphs through `buffers` and `shared`."""

    def __init__(self, schema, buffers: list, op_codes: dict, shared: dict):
        self.s = schema
        self.buffers, self.op_codes, self.shared = buffers, op_codes, shared
        self.tensors, self.ops, self.weights, self.consts = [], [], {}, {}

    def buffer(self, array: np.ndarray) -> int:
        b = self.s.BufferT()
        b.data = np.frombuffer(np.ascontiguousarray(array).tobytes(), dtype=np.uint8)
        self.buffers.append(b)
        return len(self.buffers) - 1

    def tensor(self, shape, ttype=None, name=None, buffer=0) -> int:
        t = self.s.TensorT()
        t.shape = [int(d) for d in shape]
        t.type = self.s.TensorType.FLOAT32 if ttype is None else ttype
        t.buffer = buffer
        t.name = name or f"t{len(self.tensors)}"
        self.tensors.append(t)
        return len(self.tensors) - 1

    def tensor_type(self, array: np.ndarray):
        TT = self.s.TensorType
        return {np.dtype(np.float32): TT.FLOAT32, np.dtype(np.int32): TT.INT32}[array.dtype]

    def weight(self, name: str, array: np.ndarray) -> int:
        if name not in self.weights:
            if name not in self.shared:
                self.shared[name] = self.buffer(array)
            self.weights[name] = self.tensor(array.shape, self.tensor_type(array), name,
                                             self.shared[name])
        return self.weights[name]

    def const(self, values, dtype) -> int:
        array = np.array(values, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self.consts:
            self.consts[key] = self.tensor(array.shape, self.tensor_type(array),
                                           buffer=self.buffer(array))
        return self.consts[key]

    def op(self, code, inputs, shape, ttype=None, options=None, out=None) -> int:
        if code not in self.op_codes:
            c = self.s.OperatorCodeT()
            c.builtinCode = code
            # Codes past 127 live in builtinCode only; the old byte field says so.
            c.deprecatedBuiltinCode = min(code, 127)
            c.version = 1
            self.op_codes[code] = c
        o = self.s.OperatorT()
        o.opcodeIndex = list(self.op_codes).index(code)
        o.inputs = list(inputs)
        o.outputs = [self.tensor(shape, ttype) if out is None else out]
        if options is not None:
            kind, fields = options
            opts = getattr(self.s, f"{kind}T")()
            for k, v in fields.items():
                setattr(opts, k, v)
            o.builtinOptionsType = getattr(self.s.BuiltinOptions, kind)
            o.builtinOptions = opts
        self.ops.append(o)
        return o.outputs[0]


def build_tflite_subgraph(schema, hp, weights, seq, name, buffers, op_codes, shared):
    """A decoder step over `seq` tokens: tokens [1, seq] and input_pos [seq] (int32),
    kv_cache_{k,v}_{layer} [1, context, kv_heads, head_dim] in, the same updated out
    under the same names (as ai-edge-torch's exports name them, and as LiteRT-LM needs:
    it binds one buffer per cache as both input and output), and logits [1, seq, vocab]. Query i attends to the
    cache slots up to input_pos[i]; keys are stored after RoPE. The weights are hf/'s
    float32 tensors; a projection is FULLY_CONNECTED over Hugging Face's [out, in]."""
    OP = schema.BuiltinOperator
    TT = schema.TensorType
    H, KV, D = hp["n_head"], hp["n_kv_head"], hp["head_dim"]
    hidden, V, inter = hp["hidden"], hp["vocab"], hp["intermediate"]
    R, S, C = H // KV, seq, TFLITE_CONTEXT
    g = TfliteGraph(schema, buffers, op_codes, shared)
    i32, f32 = np.int32, np.float32

    tokens = g.tensor([1, S], TT.INT32, "tokens")
    input_pos = g.tensor([S], TT.INT32, "input_pos")
    caches = [(g.tensor([1, C, KV, D], name=f"kv_cache_k_{i}"),
               g.tensor([1, C, KV, D], name=f"kv_cache_v_{i}")) for i in range(hp["n_layer"])]

    def fc(x, wname, rows, out_dim):
        return g.op(OP.FULLY_CONNECTED, [x, g.weight(wname, weights[wname]), -1], [rows, out_dim],
                    options=("FullyConnectedOptions", {}))

    def reshape(x, shape):
        return g.op(OP.RESHAPE, [x, g.const(shape, i32)], shape, g.tensors[x].type)

    def transpose(x, perm):
        shape = g.tensors[x].shape
        return g.op(OP.TRANSPOSE, [x, g.const(perm, i32)], [shape[p] for p in perm])

    def mul(a, b, shape):
        return g.op(OP.MUL, [a, b], shape)

    def add(a, b, shape):
        return g.op(OP.ADD, [a, b], shape)

    def gather(table, index, shape, ttype=None):
        return g.op(OP.GATHER, [table, index], shape, ttype, ("GatherOptions", {"axis": 0}))

    def rms_norm(x, wname):
        mean = g.op(OP.MEAN, [mul(x, x, [S, hidden]), g.const([-1], i32)], [S, 1],
                    options=("ReducerOptions", {"keepDims": True}))
        inv = g.op(OP.RSQRT, [add(mean, g.const(hp["rms_eps"], f32), [S, 1])], [S, 1])
        return mul(mul(x, inv, [S, hidden]), g.weight(wname, weights[wname]), [S, hidden])

    # RoPE: cos and sin for every cache position, gathered by input_pos; rotate_half
    # ((x1, x2) -> (-x2, x1)) as a fixed [D, D] projection.
    freqs = np.arange(C, dtype=f32)[:, None] * rope_inv_freq(D, hp["rope_theta"])[None, :]
    angles = np.concatenate([freqs, freqs], axis=-1)
    cos = reshape(gather(g.weight("rope.cos", np.cos(angles).astype(f32)), input_pos, [S, D]),
                  [S, 1, D])
    sin = reshape(gather(g.weight("rope.sin", np.sin(angles).astype(f32)), input_pos, [S, D]),
                  [S, 1, D])
    half = D // 2
    rotate = np.zeros((D, D), dtype=f32)  # [out, in]
    rotate[np.arange(half), np.arange(half) + half] = -1.0
    rotate[np.arange(half) + half, np.arange(half)] = 1.0
    weights = {**weights, "rope.rotate_half": rotate}

    def rope(x, n):  # x [S, n, D]
        rotated = reshape(fc(reshape(x, [S * n, D]), "rope.rotate_half", S * n, D), [S, n, D])
        return add(mul(x, cos, [S, n, D]), mul(rotated, sin, [S, n, D]), [S, n, D])

    slots = g.const(np.arange(C, dtype=i32).reshape(1, C), i32)
    allowed = g.op(OP.LESS_EQUAL, [slots, reshape(input_pos, [S, 1])], [S, C], TT.BOOL)
    bias = g.op(OP.SELECT_V2, [allowed, g.const(0.0, f32), g.const(np.finfo(f32).min, f32)],
                [S, C])
    first = gather(input_pos, g.const([0], i32), [1], TT.INT32)
    zero = g.const([0], i32)
    at = g.op(OP.CONCATENATION, [zero, first, zero, zero], [4], TT.INT32,
              ("ConcatenationOptions", {"axis": 0}))
    scale = g.const(1.0 / math.sqrt(D), f32)

    embed = g.weight("model.embed_tokens.weight", weights["model.embed_tokens.weight"])
    x = reshape(gather(embed, tokens, [1, S, hidden]), [S, hidden])
    presents = []
    for layer, (k_cache, v_cache) in enumerate(caches):
        p = f"model.layers.{layer}"
        h = rms_norm(x, f"{p}.input_layernorm.weight")
        q = rope(reshape(fc(h, f"{p}.self_attn.q_proj.weight", S, H * D), [S, H, D]), H)
        k = rope(reshape(fc(h, f"{p}.self_attn.k_proj.weight", S, KV * D), [S, KV, D]), KV)
        v = reshape(fc(h, f"{p}.self_attn.v_proj.weight", S, KV * D), [S, KV, D])
        keys = g.op(OP.DYNAMIC_UPDATE_SLICE, [k_cache, reshape(k, [1, S, KV, D]), at],
                    [1, C, KV, D], out=g.tensor([1, C, KV, D], name=f"kv_cache_k_{layer}"))
        values = g.op(OP.DYNAMIC_UPDATE_SLICE, [v_cache, reshape(v, [1, S, KV, D]), at],
                      [1, C, KV, D], out=g.tensor([1, C, KV, D], name=f"kv_cache_v_{layer}"))
        presents += [keys, values]
        # Per key-value head: the R query heads that share it, R*S rows at once.
        qg = reshape(transpose(reshape(q, [S, KV, R, D]), [1, 2, 0, 3]), [KV, R * S, D])
        kg = transpose(reshape(keys, [C, KV, D]), [1, 0, 2])
        vg = transpose(reshape(values, [C, KV, D]), [1, 0, 2])
        scores = g.op(OP.BATCH_MATMUL, [qg, kg], [KV, R * S, C],
                      options=("BatchMatMulOptions", {"adjX": False, "adjY": True}))
        scores = add(reshape(mul(scores, scale, [KV, R * S, C]), [KV, R, S, C]), bias,
                     [KV, R, S, C])
        probs = g.op(OP.SOFTMAX, [reshape(scores, [KV * R * S, C])], [KV * R * S, C],
                     options=("SoftmaxOptions", {"beta": 1.0}))
        ctx = g.op(OP.BATCH_MATMUL, [reshape(probs, [KV, R * S, C]), vg], [KV, R * S, D],
                   options=("BatchMatMulOptions", {"adjX": False, "adjY": False}))
        ctx = reshape(transpose(reshape(ctx, [KV, R, S, D]), [2, 0, 1, 3]), [S, H * D])
        x = add(x, fc(ctx, f"{p}.self_attn.o_proj.weight", S, hidden), [S, hidden])
        h = rms_norm(x, f"{p}.post_attention_layernorm.weight")
        gate = fc(h, f"{p}.mlp.gate_proj.weight", S, inter)
        up = fc(h, f"{p}.mlp.up_proj.weight", S, inter)
        act = mul(gate, g.op(OP.LOGISTIC, [gate], [S, inter]), [S, inter])  # SiLU
        x = add(x, fc(mul(act, up, [S, inter]), f"{p}.mlp.down_proj.weight", S, hidden),
                [S, hidden])
    x = rms_norm(x, "model.norm.weight")
    head = "lm_head.weight" if "lm_head.weight" in weights else "model.embed_tokens.weight"
    logits = g.op(OP.RESHAPE, [fc(x, head, S, V), g.const([1, S, V], i32)], [1, S, V],
                  out=g.tensor([1, S, V], name="logits"))

    sg = schema.SubGraphT()
    sg.name = name
    sg.tensors, sg.operators = g.tensors, g.ops
    sg.inputs = [tokens, input_pos] + [t for pair in caches for t in pair]
    sg.outputs = [logits] + presents
    return sg


def build_tflite(hp: dict, weights: dict[str, np.ndarray]) -> bytes:
    """The decoder as a .tflite flatbuffer with two signatures over shared weights:
    `decode` (one token) and `prefill_N` for each block of TFLITE_PREFILL_BLOCKS tokens,
    named as ai-edge-torch names its prefill signatures."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    buffers = [schema.BufferT()]  # buffer 0 is the empty one, by convention
    op_codes, shared = {}, {}
    subgraphs = [build_tflite_subgraph(schema, hp, weights, seq, name, buffers, op_codes, shared)
                 for name, seq in [("decode", 1)]
                 + [(f"prefill_{n}", n) for n in TFLITE_PREFILL_BLOCKS]]
    model = schema.ModelT()
    model.version = 3
    model.description = "llama decoder with a KV cache (modeld scripts/derive-models.py)"
    model.operatorCodes = list(op_codes.values())
    model.subgraphs = subgraphs
    model.buffers = buffers
    model.signatureDefs = []
    for index, sg in enumerate(subgraphs):
        sig = schema.SignatureDefT()
        sig.signatureKey = sg.name
        sig.subgraphIndex = index

        def tensor_map(t, sg=sg):
            m = schema.TensorMapT()
            m.name, m.tensorIndex = sg.tensors[t].name, t
            return m

        sig.inputs = [tensor_map(t) for t in sg.inputs]
        sig.outputs = [tensor_map(t) for t in sg.outputs]
        model.signatureDefs.append(sig)
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def write_tflite(out: Path, hf_dir: Path, hp: dict, weights: dict[str, np.ndarray]) -> None:
    out.mkdir(parents=True)
    (out / "model.tflite").write_bytes(build_tflite(hp, weights))
    for name in ("config.json", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json"):
        shutil.copyfile(hf_dir / name, out / name)


# LiteRT-LM's chat template: ChatML, taking a message's content as a string or as a
# list of {type, text} parts (LiteRT-LM passes lists; Hugging Face's template
# concatenates strings and fails on them). __SYSTEM__ is the model's default system turn.
LITERTLM_TEMPLATE = (
    "{%- for message in messages -%}\n"
    "{%- if loop.first and messages[0]['role'] != 'system' -%}\n"
    "{{ '<|im_start|>system\\n__SYSTEM__<|im_end|>\\n' }}\n"
    "{%- endif -%}\n"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}\n"
    "{%- if message['content'] is string -%}\n{{ message['content'] }}\n"
    "{%- else -%}\n{%- for item in message['content'] -%}\n"
    "{%- if item['type'] == 'text' -%}{{ item['text'] }}{%- endif -%}\n"
    "{%- endfor -%}\n{%- endif -%}\n"
    "{{ '<|im_end|>\\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n{{ '<|im_start|>assistant\\n' }}\n{%- endif -%}\n")


def write_litertlm(out: Path, tflite_dir: Path, hp: dict) -> None:
    """tflite/model.tflite as a LiteRT-LM bundle, model.litertlm, built offline by
    litert-lm-builder with the Hugging Face tokenizer and two metadata records:
    - executor: one state buffer per KV cache, its sequence on axis 1 (LiteRT-LM
      otherwise reads the context from axis 2), bound as both input and output;
    - model: stop tokens from generation_config.json, the ChatML template above, and
      no start token: the template opens with <|im_start|> itself, and a start token
      of that id doubled it, which sent greedy decoding off into nonsense."""
    out.mkdir(parents=True)
    hf_json = lambda name: json.loads((tflite_dir / name).read_text())
    template = hf_json("tokenizer_config.json").get("chat_template", "")
    found = re.search(r"<\|im_start\|>system(?:\n|\\n)(.*?)<\|im_end\|>", template)
    if found is None:
        fail("the chat template has no default system turn to carry into the LiteRT-LM bundle")
    eos = hf_json("generation_config.json")["eos_token_id"]
    eos = eos if isinstance(eos, list) else [eos]
    caches = [f"kv_cache_{k}_{i}" for i in range(hp["n_layer"]) for k in "kv"]
    executor = ["llm_executor_metadata {", f"  max_history_size: {TFLITE_CONTEXT}"]
    for name in caches:
        kind = "TYPE_GLOBAL_KEY_CACHE" if "_k_" in name else "TYPE_GLOBAL_VALUE_CACHE"
        executor += ["  state_buffers {"]
        executor += [f'    {field}: "{name}"' for field in (
            "prefill_input_name", "prefill_output_name", "decode_input_name", "decode_output_name")]
        executor += [f"    type: {kind}", "    sequence_axis: 1",
                     f"    minimum_sequence_length: {TFLITE_CONTEXT}",
                     f"    maximum_sequence_length: {TFLITE_CONTEXT}", "  }"]
    executor += ["  attention_mask_settings {",
                 "    attention_mask_type: ATTENTION_MASK_TYPE_CAUSAL", "  }", "}"]
    model = ['stop_tokens { token_str: "<|im_end|>" }']
    model += [f"stop_tokens {{ token_ids {{ ids: {i} }} }}" for i in eos]
    model += [
        # Greedy is top-p over the single best token: 0.18's CPU sampler has no other.
        "sampler_params { type: TOP_P k: 1 temperature: 1.0 }",
        f"max_num_tokens: {TFLITE_CONTEXT}",
        "llm_model_type { generic_model { } }",
        "jinja_prompt_template: " + json.dumps(LITERTLM_TEMPLATE.replace("__SYSTEM__",
                                                                         found.group(1))),
        "supports_thinking: false",
        "supports_function_calling: false",
    ]
    builder = Path(sys.executable).with_name("litert-lm-builder")
    with tempfile.TemporaryDirectory() as meta:
        meta = Path(meta)
        (meta / "executor.pbtxt").write_text("\n".join(executor) + "\n")
        (meta / "model.pbtxt").write_text("\n".join(model) + "\n")
        result = subprocess.run(
            [str(builder), "system_metadata", "--str", "Authors", "modeld",
             "llm_metadata", "--path", str(meta / "model.pbtxt"),
             "executor_metadata", "--path", str(meta / "executor.pbtxt"),
             "tflite_model", "--path", str(tflite_dir / "model.tflite"),
             "--model_type", "prefill_decode", "--prefer_activation_type", "fp32",
             "hf_tokenizer", "--path", str(tflite_dir / "tokenizer.json"),
             "output", "--path", str(out / "model.litertlm")],
            capture_output=True, text=True)
    if result.returncode != 0:
        fail(f"litert-lm-builder failed: {result.stderr.strip()[-2000:]}")
    for name in ("config.json", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json"):
        shutil.copyfile(tflite_dir / name, out / name)


class TfliteDecoder:
    """tflite/model.tflite through LiteRT's Python interpreter, one signature call per
    step, the caches of one call fed to the next."""

    def __init__(self, tflite_dir: Path, hp: dict):
        from ai_edge_litert.interpreter import Interpreter

        self.hp = hp
        interpreter = Interpreter(model_path=str(tflite_dir / "model.tflite"))
        self.decode = interpreter.get_signature_runner("decode")
        self.prefill = interpreter.get_signature_runner(f"prefill_{TFLITE_PREFILL}")

    def empty_cache(self) -> dict:
        shape = (1, TFLITE_CONTEXT, self.hp["n_kv_head"], self.hp["head_dim"])
        return {f"kv_cache_{k}_{i}": np.zeros(shape, np.float32)
                for i in range(self.hp["n_layer"]) for k in "kv"}

    def step(self, runner, ids, start, cache):
        out = runner(tokens=np.array([ids], np.int32),
                     input_pos=np.arange(start, start + len(ids), dtype=np.int32), **cache)
        cache = {k: out[k] for k in cache}
        return out["logits"][0], cache


# --------------------------------------------------------------------------- verify

class NumpyLlama:
    """A plain numpy forward pass over hf/ (no cache): the reference the ONNX graph
    is checked against, written independently of it."""

    def __init__(self, hf_dir: Path):
        from safetensors.numpy import load_file

        self.w = load_file(str(hf_dir / "model.safetensors"))
        c = json.loads((hf_dir / "config.json").read_text())
        self.c = c
        self.H, self.KV = c["num_attention_heads"], c["num_key_value_heads"]
        self.D = c["head_dim"]
        self.eps = np.float32(c["rms_norm_eps"])
        self.inv_freq = rope_inv_freq(self.D, c["rope_theta"])

    def norm(self, x, name):
        var = np.mean(x * x, axis=-1, keepdims=True)
        return (x / np.sqrt(var + self.eps)) * self.w[name]

    def rope(self, x, cos, sin):  # x [n, S, D]
        half = self.D // 2
        rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
        return x * cos + rotated * sin

    def logits(self, ids: list[int]) -> np.ndarray:  # [S, V]
        w, H, KV, D = self.w, self.H, self.KV, self.D
        S = len(ids)
        x = w["model.embed_tokens.weight"][np.array(ids)]
        freqs = np.arange(S, dtype=np.float32)[:, None] * self.inv_freq[None, :]
        angles = np.concatenate([freqs, freqs], axis=-1)
        cos, sin = np.cos(angles), np.sin(angles)
        mask = np.triu(np.full((S, S), -np.inf, dtype=np.float32), 1)
        for i in range(self.c["num_hidden_layers"]):
            p = f"model.layers.{i}"
            h = self.norm(x, f"{p}.input_layernorm.weight")
            q = (h @ w[f"{p}.self_attn.q_proj.weight"].T).reshape(S, H, D).transpose(1, 0, 2)
            k = (h @ w[f"{p}.self_attn.k_proj.weight"].T).reshape(S, KV, D).transpose(1, 0, 2)
            v = (h @ w[f"{p}.self_attn.v_proj.weight"].T).reshape(S, KV, D).transpose(1, 0, 2)
            q, k = self.rope(q, cos, sin), self.rope(k, cos, sin)
            k, v = np.repeat(k, H // KV, axis=0), np.repeat(v, H // KV, axis=0)
            scores = q @ k.transpose(0, 2, 1) / np.float32(math.sqrt(D)) + mask
            scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
            probs = scores / scores.sum(axis=-1, keepdims=True)
            ctx = (probs @ v).transpose(1, 0, 2).reshape(S, H * D)
            x = x + ctx @ w[f"{p}.self_attn.o_proj.weight"].T
            h = self.norm(x, f"{p}.post_attention_layernorm.weight")
            gate = h @ w[f"{p}.mlp.gate_proj.weight"].T
            up = h @ w[f"{p}.mlp.up_proj.weight"].T
            x = x + ((gate / (1 + np.exp(-gate))) * up) @ w[f"{p}.mlp.down_proj.weight"].T
        x = self.norm(x, "model.norm.weight")
        head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
        return x @ head.T


class OrtDecoder:
    """onnx/model.onnx through ONNX Runtime, driven the way onnxruntime-genai does."""

    def __init__(self, onnx_dir: Path):
        import onnxruntime as ort

        c = json.loads((onnx_dir / "genai_config.json").read_text())["model"]["decoder"]
        self.layers, self.kv, self.d = c["num_hidden_layers"], c["num_key_value_heads"], c["head_size"]
        self.session = ort.InferenceSession(str(onnx_dir / "model.onnx"),
                                            providers=["CPUExecutionProvider"])

    def empty_cache(self, batch: int = 1) -> dict:
        zeros = np.zeros((batch, self.kv, 0, self.d), dtype=np.float32)
        return {f"past_key_values.{i}.{kind}": zeros
                for i in range(self.layers) for kind in ("key", "value")}

    def run(self, ids, cache, mask=None, positions=None):
        """Feeds ids [B, S] after the cache; returns logits [B, S, V] and the new cache."""
        ids = np.asarray(ids, dtype=np.int64)
        past = cache["past_key_values.0.key"].shape[2]
        if mask is None:
            mask = np.ones((ids.shape[0], past + ids.shape[1]), dtype=np.int64)
        if positions is None:
            positions = np.broadcast_to(np.arange(past, past + ids.shape[1]), ids.shape)
        feeds = {"input_ids": ids, "attention_mask": np.asarray(mask, dtype=np.int64),
                 "position_ids": np.ascontiguousarray(positions, dtype=np.int64), **cache}
        names = [o.name for o in self.session.get_outputs()]
        results = dict(zip(names, self.session.run(names, feeds)))
        new_cache = {f"past_key_values.{i}.{kind}": results[f"present.{i}.{kind}"]
                     for i in range(self.layers) for kind in ("key", "value")}
        return results["logits"], new_cache

    def greedy(self, prompt: list[int], n: int, stop=()) -> list[int]:
        logits, cache = self.run([prompt], self.empty_cache())
        out = []
        while True:
            token = int(np.argmax(logits[0, -1]))
            out.append(token)
            if len(out) == n or token in stop:
                return out
            logits, cache = self.run([[token]], cache)

    def greedy_no_cache(self, prompt: list[int], n: int) -> list[int]:
        ids = list(prompt)
        for _ in range(n):
            logits, _ = self.run([ids], self.empty_cache())
            ids.append(int(np.argmax(logits[0, -1])))
        return ids[len(prompt):]


def verify(outdir: Path) -> None:
    hf_dir, onnx_dir = outdir / "hf", outdir / "onnx"
    vocab = json.loads((hf_dir / "tokenizer.json").read_text())["model"]["vocab"]
    # Whole-word vocabulary entries make a real prompt without needing a tokenizer.
    words = ["The", "Ġcapital", "Ġof", "ĠFrance", "Ġis", "ĠParis", ".", "ĠThe", "Ġcapital",
             "Ġof", "ĠGermany", "Ġis"]
    prompt = [vocab[w] for w in words]
    failures = []

    def check(ok: bool, what: str):
        print(f"verify: {'ok  ' if ok else 'FAIL'} {what}")
        if not ok:
            failures.append(what)

    t0 = time.perf_counter()
    ref = NumpyLlama(hf_dir).logits(prompt)
    dec = OrtDecoder(onnx_dir)
    ort_logits, _ = dec.run([prompt], dec.empty_cache())
    diff = float(np.abs(ref - ort_logits[0]).max())
    check(diff < 1e-2, f"numpy (hf/) vs ONNX Runtime (onnx/) logits, {len(prompt)} tokens: "
                       f"max |diff| {diff:.2e} (logit range {ref.min():.1f}..{ref.max():.1f})")

    cached = dec.greedy(prompt, 9)
    uncached = dec.greedy_no_cache(prompt, 9)
    check(cached == uncached, f"prefill + 8 decode steps with KV cache == full recompute: {cached}")

    # Chunked prefill: the second chunk has past > 0 and more than one query.
    logits_a, cache = dec.run([prompt[:5]], dec.empty_cache())
    logits_b, _ = dec.run([prompt[5:]], cache)
    chunked = np.concatenate([logits_a[0], logits_b[0]])
    diff = float(np.abs(chunked - ort_logits[0]).max())
    check(diff < 1e-3, f"chunked prefill (5 + {len(prompt) - 5}) vs one pass: max |diff| {diff:.2e}")

    # Left padding in a batch: the padded row must match the same prompt alone.
    pad = 4
    short = prompt[pad:]
    ids = [prompt, [0] * pad + short]
    mask = [[1] * len(prompt), [0] * pad + [1] * len(short)]
    positions = [list(range(len(prompt))), [0] * pad + list(range(len(short)))]
    batch_logits, _ = dec.run(ids, dec.empty_cache(), mask=mask, positions=positions)
    alone, _ = dec.run([short], dec.empty_cache())
    diff = max(float(np.abs(batch_logits[1, pad:] - alone[0]).max()),
               float(np.abs(batch_logits[0] - ort_logits[0]).max()))
    check(diff < 1e-3, f"batch of 2 with left padding vs each alone: max |diff| {diff:.2e}")

    tflite = TfliteDecoder(outdir / "tflite", {
        "n_layer": dec.layers, "n_kv_head": dec.kv, "head_dim": dec.d})
    cache = tflite.empty_cache()
    stepped = []
    for i, token in enumerate(prompt):
        logits, cache = tflite.step(tflite.decode, [token], i, cache)
        stepped.append(logits[0])
    diff = float(np.abs(np.stack(stepped) - ref).max())
    check(diff < 1e-2, f"numpy vs LiteRT (tflite/), token by token through `decode`: "
                       f"max |diff| {diff:.2e}")
    padded = prompt + [0] * (TFLITE_PREFILL - len(prompt))
    logits, cache = tflite.step(tflite.prefill, padded, 0, tflite.empty_cache())
    diff = float(np.abs(logits[:len(prompt)] - ref).max())
    check(diff < 1e-2, f"numpy vs LiteRT `prefill` ({len(prompt)} tokens padded to "
                       f"{TFLITE_PREFILL}): max |diff| {diff:.2e}")
    greedy = [int(logits[len(prompt) - 1].argmax())]
    while len(greedy) < len(cached):
        step, cache = tflite.step(tflite.decode, [greedy[-1]], len(prompt) + len(greedy) - 1,
                                  cache)
        greedy.append(int(step[0].argmax()))
    check(greedy == cached, f"LiteRT prefill + decode steps == ONNX Runtime's greedy: {greedy}")

    try:
        import tokenizers
    except ImportError:
        tokenizers = None
        print("verify: skip tokenizer and chat checks (the tokenizers package is not installed)")
    if tokenizers is not None:
        import jinja2.sandbox

        tok = tokenizers.Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
        ids = tok.encode("The capital of France is Paris. The capital of Germany is",
                         add_special_tokens=False).ids
        check(ids == prompt, "tokenizer.json encodes the prompt as its whole-word tokens")
        check(tok.to_str() == (hf_dir / "tokenizer.json").read_text(encoding="utf-8"),
              f"tokenizers {tokenizers.__version__} re-serializes tokenizer.json byte for byte")

        config = json.loads((hf_dir / "tokenizer_config.json").read_text())
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        text = env.from_string(config["chat_template"]).render(
            messages=[{"role": "user", "content": "Tell me the capital of France."}],
            add_generation_prompt=True, bos_token=config.get("bos_token", ""),
            eos_token=config.get("eos_token", ""))
        chat = tok.encode(text, add_special_tokens=False).ids
        eos = tok.token_to_id(config["eos_token"])
        answer = dec.greedy(chat, 20, stop={eos})
        reply = tok.decode(answer, skip_special_tokens=True)
        check("Paris" in reply, f"greedy chat answer ({len(chat)} prompt tokens): {reply!r}")
        print(f"verify: chat prompt ids {chat}")
        print(f"verify: chat answer ids {answer}")

    # Throughput, for information: ONNX Runtime's default threads, batch 1.
    long_prompt = (prompt * 11)[:128]
    start = time.perf_counter()
    logits, cache = dec.run([long_prompt], dec.empty_cache())
    prefill = time.perf_counter() - start
    token = int(np.argmax(logits[0, -1]))
    start = time.perf_counter()
    for _ in range(64):
        logits, cache = dec.run([[token]], cache)
        token = int(np.argmax(logits[0, -1]))
    decode = time.perf_counter() - start
    print(f"verify: ONNX Runtime speed: prefill 128 tokens {128 / prefill:.0f} tok/s, "
          f"decode 64 tokens {64 / decode:.1f} tok/s")
    print(f"verify: {'FAILED' if failures else 'passed'} in {time.perf_counter() - t0:.1f} s")
    if failures:
        sys.exit(1)


# --------------------------------------------------------------------------- main

def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# MLX's affine quantization as mlx-lm writes it: 4 bits, with bfloat16 scales, biases
# and norms (the dtype SmolLM2 was released in). Groups of 32, not mlx-lm's default
# 64: the weights were Q4_1 in blocks of 32 already, and groups of 32 line up with
# them, where groups of 64 quantize twice across two blocks and this small model
# stops answering ("The capital of France is Paris." becomes "L'Alcazebula, la
# France").
MLX_BITS = 4
MLX_GROUP_SIZE = 32
MLX_DTYPE = "bfloat16"


def write_mlx(out: Path, hf_dir: Path) -> None:
    """The hf/ directory quantized by MLX itself: mlx-lm's own converter, so the
    layout (packed uint32 weights with per-group scales and biases, the quantization
    block in config.json, an index of the weights) is the one mlx-lm writes."""
    import contextlib
    import io

    from mlx_lm import convert

    # mlx-lm reports progress on stdout; this script's one line of output stays last.
    with contextlib.redirect_stdout(io.StringIO()):
        convert(str(hf_dir), mlx_path=str(out), quantize=True, q_group_size=MLX_GROUP_SIZE,
                q_bits=MLX_BITS, dtype=MLX_DTYPE)


def derive(gguf_path: Path, outdir: Path) -> None:
    start = time.perf_counter()
    g = Gguf(gguf_path)
    hp = hyperparameters(g)
    weights = hf_state_dict(g.tensors(), hp)
    n_params = sum(w.size for w in weights.values())

    outdir = outdir.absolute()
    outdir.parent.mkdir(parents=True, exist_ok=True)
    # Scratch space on OUTDIR's filesystem, so the final rename is atomic.
    scratch = Path(tempfile.mkdtemp(prefix=f".{outdir.name}.partial-", dir=outdir.parent))
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(scratch, 0o777 & ~umask)  # mkdtemp makes it private
        write_hf(scratch / "hf", g, hp, weights)
        write_onnx(scratch / "onnx", scratch / "hf", g, hp, weights)
        write_mlx(scratch / "mlx", scratch / "hf")
        write_tflite(scratch / "tflite", scratch / "hf", hp, weights)
        write_litertlm(scratch / "litertlm", scratch / "tflite", hp)
        for f in scratch.rglob("*"):  # safetensors and onnx write their files private
            if f.is_file():
                os.chmod(f, 0o666 & ~umask)
        if outdir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{outdir.name}.old-", dir=outdir.parent))
            os.rename(outdir, old / "x")
            os.rename(scratch, outdir)
            shutil.rmtree(old)
        else:
            os.rename(scratch, outdir)
    finally:
        if scratch.exists():
            shutil.rmtree(scratch)

    mb = 1e6
    print(f"derive-models: {gguf_path.name} -> {outdir}: {n_params / 1e6:.1f}M params, "
          f"hf/ {dir_size(outdir / 'hf') / mb:.0f} MB, onnx/ {dir_size(outdir / 'onnx') / mb:.0f} MB, "
          f"mlx/ {dir_size(outdir / 'mlx') / mb:.0f} MB, "
          f"tflite/ {dir_size(outdir / 'tflite') / mb:.0f} MB, "
          f"litertlm/ {dir_size(outdir / 'litertlm') / mb:.0f} MB, "
          f"{time.perf_counter() - start:.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("gguf", type=Path, help="a llama GGUF (e.g. SmolLM2-135M-Instruct.Q4_1.gguf)")
    parser.add_argument("outdir", type=Path, help="written as OUTDIR/hf, OUTDIR/onnx, OUTDIR/mlx, OUTDIR/tflite "
                        "and OUTDIR/litertlm")
    parser.add_argument("--verify", action="store_true",
                        help="then compare hf/ and onnx/ outputs (numpy vs ONNX Runtime)")
    args = parser.parse_args()
    if not args.gguf.is_file():
        fail(f"{args.gguf} is not a file")
    # A plain kill runs the cleanup in derive() too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    derive(args.gguf, args.outdir)
    if args.verify:
        verify(args.outdir.absolute())


if __name__ == "__main__":
    main()
