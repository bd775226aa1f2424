#!/usr/bin/env python3
"""Generate small, deterministic, real-format model fixtures for modeld tests.

Usage: gen-fixtures.py OUTDIR

Every file is < 1 MB and byte-for-byte identical between runs (given the same
numpy / onnx / gguf / zlib versions). The fixtures exercise *content-based*
format detection: file names are chosen for humans, the scanner must not rely on
them (except for picoLLM, whose header is not publicly documented).

Needs: numpy, onnx, gguf (installed by scripts/fetch-test-assets into its venv).
OUTDIR/MANIFEST.json lists every file with sha256, size and expected format.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import struct
import sys
import tarfile
import uuid
import zipfile
from pathlib import Path

import numpy as np

GENERATOR_MARK = "modeld scripts/gen-fixtures.py"
ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)  # earliest DOS timestamp: fixed for determinism

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

VOCAB = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "hello", "world", "the",
         "a", "model", "edge", "tiny", "llama", "user", "assistant", "system"]


# --------------------------------------------------------------------------- helpers

def det_bytes(seed: str, n: int) -> bytes:
    """Deterministic pseudo-random bytes (SHA-256 in counter mode; stable forever)."""
    out = bytearray()
    counter = 0
    while len(out) < n:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest()
        counter += 1
    return bytes(out[:n])


def write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def jdump(obj) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode()


# --------------------------------------------------------------------------- GGUF

def gen_gguf(path: Path) -> None:
    from gguf import GGUFWriter, LlamaFileType

    w = GGUFWriter(str(path), "llama")  # writes general.architecture = "llama"
    w.add_name("tiny-llama")
    w.add_context_length(256)
    w.add_embedding_length(8)
    w.add_block_count(1)
    w.add_file_type(LlamaFileType.ALL_F32)  # general.file_type = 0 (all F32)
    w.add_chat_template(CHATML_TEMPLATE)
    # numpy shape (16, 8) -> GGUF dims [8, 16] (ne0 = n_embd, ne1 = n_vocab)
    w.add_tensor("token_embd.weight", (np.arange(16 * 8, dtype=np.float32) / 128.0).reshape(16, 8))
    w.add_tensor("output_norm.weight", np.ones(8, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def gen_corrupt_ggufs(out: Path, tiny: Path, expect: dict) -> None:
    """Valid-looking GGUFs with one lie each, for the validation stage. Every one must
    be refused by the agent's reader before llama.cpp (which asserts) sees it."""
    import struct
    from gguf import GGUFReader, GGUFWriter, LlamaFileType

    base = tiny.read_bytes()
    reader = GGUFReader(str(tiny))

    def at_last_part(field) -> int:
        return field.offset + sum(p.nbytes for p in field.parts[:-1])

    def patched(data: bytes, offset: int, value: bytes) -> bytes:
        return data[:offset] + value + data[offset + len(value):]

    variants: dict[str, tuple[bytes, str]] = {}
    variants["truncated-data.gguf"] = (base[: len(base) - 200],
                                       "header intact, tensor data cut short")
    variants["bad-magic.gguf"] = (b"GGUX" + base[4:], "magic is not GGUF")
    # tensor_count at offset 8 (after magic and version): absurdly large.
    variants["absurd-counts.gguf"] = (patched(base, 8, struct.pack("<Q", 1 << 60)),
                                      "tensor count 2^60 in a tiny file")
    last = reader.tensors[-1]
    variants["offset-past-end.gguf"] = (
        patched(base, at_last_part(last.field), struct.pack("<Q", 1 << 40)),
        "last tensor's data offset lies far past the end of the file")

    # A file that names its alignment, then the alignment patched to 0.
    aligned = out / "aligned.tmp"
    out.mkdir(parents=True, exist_ok=True)
    w = GGUFWriter(str(aligned), "llama")
    w.add_custom_alignment(32)
    w.add_context_length(256)
    w.add_embedding_length(8)
    w.add_block_count(1)
    w.add_file_type(LlamaFileType.ALL_F32)
    w.add_tensor("output_norm.weight", np.ones(8, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    data = aligned.read_bytes()
    field = GGUFReader(str(aligned)).fields["general.alignment"]
    variants["alignment-zero.gguf"] = (patched(data, at_last_part(field), struct.pack("<I", 0)),
                                       "general.alignment = 0")
    aligned.unlink()

    for name, (data, why) in variants.items():
        write(out / name, data)
        expect[f"corrupt/{name}"] = {"format": "none", "corrupt": why}


# --------------------------------------------------------------------------- ONNX

def gen_onnx(path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    emb = (np.arange(16 * 16, dtype=np.float32) / 256.0).reshape(16, 16)
    init = numpy_helper.from_array(emb, name="embed_tokens.weight")
    node = helper.make_node("Gather", ["embed_tokens.weight", "input_ids"], ["logits"],
                            name="embed_gather", axis=0)
    graph = helper.make_graph(
        [node],
        "tiny_decoder",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", 16])],
        initializer=[init],
    )
    model = helper.make_model(graph, producer_name="modeld-fixtures", producer_version="1",
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    write(path, model.SerializeToString())


# --------------------------------------------------------------------------- safetensors

_ST_DTYPES = {
    np.dtype("float32"): "F32", np.dtype("float16"): "F16", np.dtype("float64"): "F64",
    np.dtype("int64"): "I64", np.dtype("int32"): "I32", np.dtype("int16"): "I16",
    np.dtype("int8"): "I8", np.dtype("uint8"): "U8", np.dtype("bool"): "BOOL",
}


def safetensors_bytes(tensors: dict[str, np.ndarray], metadata: dict[str, str] | None) -> bytes:
    """u64 LE header length N | N bytes JSON header (space padded to 8) | raw LE data."""
    header: dict = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    blobs = []
    offset = 0
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        data = a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": _ST_DTYPES[a.dtype], "shape": list(a.shape),
                        "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * ((8 - len(hb) % 8) % 8)
    return struct.pack("<Q", len(hb)) + hb + b"".join(blobs)


def gen_hf_dir(d: Path) -> None:
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 16,
        "hidden_size": 8,
        "intermediate_size": 16,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-05,
        "hidden_act": "silu",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "transformers_version": "4.44.0",
    }
    write(d / "config.json", jdump(config))
    tensors = {
        "model.embed_tokens.weight": (np.arange(16 * 8, dtype=np.float32) / 128.0).reshape(16, 8),
        "model.layers.0.input_layernorm.weight": np.ones(8, dtype=np.float32),
        "model.norm.weight": np.ones(8, dtype=np.float32),
        "lm_head.weight": (np.arange(16 * 8, dtype=np.float32)[::-1] / 128.0).reshape(16, 8).copy(),
    }
    write(d / "model.safetensors", safetensors_bytes(tensors, {"format": "pt"}))
    write(d / "tokenizer.json", jdump(tokenizer_json()))


def tokenizer_json() -> dict:
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": True}
            for i, t in enumerate(VOCAB[:5])
        ],
        "normalizer": None,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": None,
        "decoder": None,
        "model": {"type": "WordLevel", "vocab": {t: i for i, t in enumerate(VOCAB)},
                  "unk_token": "<unk>"},
    }


def gen_single_safetensors(path: Path) -> None:
    tensors = {
        "weight": (np.arange(16, dtype=np.float32) - 8.0).reshape(4, 4),
        "bias": np.array([0.5, -0.5, 1.0, -1.0], dtype=np.float16),
        "step": np.array([42], dtype=np.int64),
    }
    write(path, safetensors_bytes(tensors, {"format": "pt", "source": "modeld-fixtures"}))


# --------------------------------------------------------------------------- FlatBuffers
#
# Minimal forward-layout FlatBuffers writer: every parent is written before its
# children, so all uoffset_t values are positive, as the format requires. The
# vtable of each table is written immediately before the table (soffset > 0).
# Objects:
#   ("table", [(slot, kind, value), ...])   kind: u8 bool i32 u32 i64 u64 off
#   ("str", "text")
#   ("vec", kind, [items], force_align)     kind: u8 i32 u32 i64 u64 off

_SCALAR = {"u8": "<B", "bool": "<B", "i32": "<i", "u32": "<I", "i64": "<q", "u64": "<Q"}


def T(*fields):
    return ("table", list(fields))


def S(text):
    return ("str", text)


def V(kind, items, force_align=1, claimed=None):
    """`claimed` writes a length other than the items' (a hostile fixture's lie)."""
    return ("vec", kind, list(items), force_align, claimed)


class FlatBufferWriter:
    def __init__(self, file_identifier: bytes, reserved: int = 0):
        assert len(file_identifier) == 4
        # 0..4 root uoffset (patched), 4..8 identifier, then `reserved` bytes
        # (ExecuTorch puts its extended header there).
        self.buf = bytearray(8 + reserved)
        self.buf[4:8] = file_identifier

    def _pad_to(self, align: int, extra: int = 0) -> None:
        while (len(self.buf) + extra) % align:
            self.buf.append(0)

    def _patch_uoffset(self, slot_pos: int, target: int) -> None:
        assert target > slot_pos
        struct.pack_into("<I", self.buf, slot_pos, target - slot_pos)

    def emit(self, obj) -> int:
        tag = obj[0]
        if tag == "str":
            data = obj[1].encode()
            self._pad_to(4)
            pos = len(self.buf)
            self.buf += struct.pack("<I", len(data)) + data + b"\0"
            return pos
        if tag == "vec":
            _, kind, items, force_align, claimed = obj
            esize = 4 if kind == "off" else struct.calcsize(_SCALAR[kind])
            self._pad_to(max(4, esize, force_align), extra=4)  # element 0 aligned
            pos = len(self.buf)
            self.buf += struct.pack("<I", len(items) if claimed is None else claimed)
            pending = []
            for it in items:
                if kind == "off":
                    pending.append((len(self.buf), it))
                    self.buf += b"\0\0\0\0"
                else:
                    self.buf += struct.pack(_SCALAR[kind], it)
            for slot_pos, child in pending:
                self._patch_uoffset(slot_pos, self.emit(child))
            return pos
        if tag == "table":
            fields = sorted(obj[1], key=lambda f: f[0])
            nslots = (fields[-1][0] + 1) if fields else 0
            sizes = [4 if k == "off" else struct.calcsize(_SCALAR[k]) for _, k, _ in fields]
            talign = max([4] + sizes)
            self._pad_to(2)
            vt_pos = len(self.buf)
            vt_len = 4 + 2 * nslots
            self.buf += b"\0" * vt_len
            self._pad_to(talign)
            t_pos = len(self.buf)
            self.buf += struct.pack("<i", t_pos - vt_pos)  # soffset: vtable = table - soffset
            field_offsets = [0] * nslots
            pending = []
            for (slot, kind, value), size in zip(fields, sizes):
                self._pad_to(size)
                field_offsets[slot] = len(self.buf) - t_pos
                if kind == "off":
                    pending.append((len(self.buf), value))
                    self.buf += b"\0\0\0\0"
                else:
                    self.buf += struct.pack(_SCALAR[kind], value)
            t_size = len(self.buf) - t_pos
            struct.pack_into(f"<HH{nslots}H", self.buf, vt_pos, vt_len, t_size, *field_offsets)
            for slot_pos, child in pending:
                self._patch_uoffset(slot_pos, self.emit(child))
            return t_pos
        raise ValueError(tag)

    def finish(self, root, pad_to: int = 16) -> bytearray:
        root_pos = self.emit(root)
        struct.pack_into("<I", self.buf, 0, root_pos)
        self._pad_to(pad_to)
        return self.buf


def gen_tflite(path: Path) -> None:
    # tflite.Model (schema.fbs, file_identifier "TFL3"):
    #   0 version:uint, 1 operator_codes, 2 subgraphs, 3 description:string, 4 buffers
    subgraph = T(
        (0, "off", V("off", [])),      # tensors
        (1, "off", V("i32", [])),      # inputs
        (2, "off", V("i32", [])),      # outputs
        (3, "off", V("off", [])),      # operators
        (4, "off", S("main")),         # name
    )
    model = T(
        (0, "u32", 3),                                   # schema version 3
        (1, "off", V("off", [])),                        # operator_codes
        (2, "off", V("off", [subgraph])),                # subgraphs
        (3, "off", S("modeld tiny tflite fixture")),     # description
        (4, "off", V("off", [T()])),                     # buffers: [0] = empty sentinel
    )
    write(path, bytes(FlatBufferWriter(b"TFL3").finish(model)))


def tflite_add_model(lie: str | None = None) -> tuple:
    """A small valid TFLite model, y = x + c (x [1, 4] float32, c a constant), with a
    `serving_default` signature, or the same with one lie (for the engine's checker;
    every lie must be refused before LiteRT sees the file)."""
    f32, ADD = 0, 0
    c = struct.pack("<4f", 1.0, 2.0, 3.0, 4.0)
    if lie == "buffer-size":
        c = c[:12]
    const_buffer = [(0, "off", V("u8", c, force_align=16))]
    if lie == "buffer-offset":
        const_buffer = [(1, "u64", 1 << 40), (2, "u64", 16)]

    def tensor(shape, name, buffer=0):
        return T((0, "off", V("i32", shape)), (1, "u8", f32), (2, "u32", buffer), (3, "off", S(name)))

    x_shape = {"negative-dim": [1, -4], "rank": [1] * 9}.get(lie, [1, 4])
    tensors = [tensor(x_shape, "x"), tensor([4], "c", 99 if lie == "buffer-index" else 1),
               tensor([1, 4], "y")]
    op_inputs = [0, 50] if lie == "operator-tensor" else [0, 1]
    operator = T((0, "u32", 7 if lie == "opcode-index" else 0),
                 (1, "off", V("i32", op_inputs)), (2, "off", V("i32", [2])))
    subgraph = T(
        (0, "off", V("off", tensors, claimed=0x3FFFFFFF if lie == "vector-length" else None)),
        (1, "off", V("i32", [0])),
        (2, "off", V("i32", [2])),
        (3, "off", V("off", [operator])),
        (4, "off", S("main")),
    )
    signature = T(
        (0, "off", V("off", [T((0, "off", S("x")), (1, "u32", 9 if lie == "signature-tensor" else 0))])),
        (1, "off", V("off", [T((0, "off", S("y")), (1, "u32", 2))])),
        (2, "off", S("serving_default")),
        (4, "u32", 3 if lie == "signature-subgraph" else 0),
    )
    model = [
        (0, "u32", 2 if lie == "schema-version" else 3),
        (1, "off", V("off", [T((0, "u8", ADD), (2, "i32", 1), (3, "i32", ADD))])),
        (2, "off", V("off", [subgraph])),
        (3, "off", S("modeld add fixture")),
        (4, "off", V("off", [T(), T(*const_buffer)])),
        (7, "off", V("off", [signature])),
    ]
    if lie == "external-buffers":
        model.append((9, "off", V("off", [T((0, "u32", 1), (1, "off", S("../weights.bin")))])))
    return T(*model)


# Each hostile .tflite and what the refusal must say.
TFLITE_LIES = {
    "buffer-index": "names buffer 99",
    "buffer-size": "holds 12 bytes",
    "buffer-offset": "past the end",
    "opcode-index": "operator code 7",
    "operator-tensor": "tensor 50",
    "signature-tensor": "tensor 9",
    "signature-subgraph": "subgraph 3",
    "negative-dim": "dimension -4",
    "rank": "the limit is 8",
    "vector-length": "limit",
    "schema-version": "schema version 2",
    "external-buffers": "external files",
    "truncated": "past the end",
}


def gen_tflite_checks(out: Path, expect: dict) -> None:
    """tflite/add.tflite and tflite/hostile/*.tflite (one lie each)."""
    valid = bytes(FlatBufferWriter(b"TFL3").finish(tflite_add_model()))
    write(out / "add.tflite", valid)
    expect["tflite/add.tflite"] = {"format": "tflite"}
    for lie, says in TFLITE_LIES.items():
        if lie == "truncated":
            data = valid[: len(valid) // 2]
        else:
            data = bytes(FlatBufferWriter(b"TFL3").finish(tflite_add_model(lie)))
        write(out / "hostile" / f"{lie}.tflite", data)
        expect[f"tflite/hostile/{lie}.tflite"] = {"format": "tflite", "corrupt": says}
    write(out / "hostile" / "expected.json", jdump(TFLITE_LIES))
    expect["tflite/hostile/expected.json"] = {"format": "none"}


ET_EXT_HEADER_LEN = 32          # eh00 header: magic, u32 len, u64 x3
ET_SEGMENT_ALIGNMENT = 128


def gen_pte(path: Path) -> None:
    # executorch_flatbuffer.Program (schema/program.fbs, file_identifier "ET12"):
    #   0 version:uint, 1 execution_plan, 2 constant_buffer, 3 backend_delegate_data,
    #   4 segments:[DataSegment], 5 constant_segment:SubsegmentOffsets, ...
    const_data = np.array([1.0, 2.0, 3.0, 4.0], dtype="<f4").tobytes()  # one constant tensor
    plan = T(
        (0, "off", S("forward")),                                   # name
        (1, "off", T((0, "off", S("")), (1, "off", S("")))),        # container_meta_type
        (2, "off", V("off", [])),                                   # values
        (3, "off", V("i32", [])),                                   # inputs
        (4, "off", V("i32", [])),                                   # outputs
        (5, "off", V("off", [])),                                   # chains
        (6, "off", V("off", [])),                                   # operators
        (7, "off", V("off", [])),                                   # delegates
        (8, "off", V("i64", [0])),                                  # non_const_buffer_sizes
    )
    program = T(
        (0, "u32", 0),                                              # version
        (1, "off", V("off", [plan])),                               # execution_plan
        (2, "off", V("off", [])),                                   # constant_buffer
        (3, "off", V("off", [])),                                   # backend_delegate_data
        (4, "off", V("off", [T((0, "u64", 0), (1, "u64", len(const_data)))])),  # segments
        (5, "off", T((0, "u32", 0), (1, "off", V("u64", [0, 0])))),  # constant_segment
    )
    fbw = FlatBufferWriter(b"ET12", reserved=ET_EXT_HEADER_LEN)
    buf = fbw.finish(program)
    program_size = len(buf)
    segment_base = -(-program_size // ET_SEGMENT_ALIGNMENT) * ET_SEGMENT_ALIGNMENT
    struct.pack_into("<4sIQQQ", buf, 8, b"eh00", ET_EXT_HEADER_LEN, program_size,
                     segment_base, len(const_data))
    data = bytes(buf) + b"\0" * (segment_base - program_size) + const_data
    write(path, data)


# --------------------------------------------------------------------------- Core ML (protobuf)

def _varint(n: int) -> bytes:
    if n < 0:
        n &= (1 << 64) - 1
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def pb_varint(field: int, value: int) -> bytes:
    return _varint(field << 3 | 0) + _varint(value)


def pb_bytes(field: int, payload: bytes) -> bytes:
    return _varint(field << 3 | 2) + _varint(len(payload)) + payload


def pb_str(field: int, s: str) -> bytes:
    return pb_bytes(field, s.encode())


ARRAY_INT32 = 131104     # ArrayFeatureType.ArrayDataType.INT32   (0x20000 | 32)
ARRAY_FLOAT32 = 65568    # ArrayFeatureType.ArrayDataType.FLOAT32 (0x10000 | 32)


def coreml_model_bytes() -> bytes:
    """CoreML.Specification.Model (Model.proto / FeatureTypes.proto field numbers)."""
    def multiarray(shape, dtype):
        # ArrayFeatureType: 1 repeated int64 shape (packed), 2 dataType
        at = pb_bytes(1, b"".join(_varint(x) for x in shape)) + pb_varint(2, dtype)
        return pb_bytes(5, at)  # FeatureType.multiArrayType = 5

    def feature(name, short, ftype):
        # FeatureDescription: 1 name, 2 shortDescription, 3 type
        return pb_str(1, name) + pb_str(2, short) + pb_bytes(3, ftype)

    metadata = pb_str(1, "modeld tiny Core ML fixture") + pb_str(2, "1") + pb_str(3, "modeld")
    description = (
        pb_bytes(1, feature("input_ids", "token ids", multiarray([1, 8], ARRAY_INT32)))      # input
        + pb_bytes(10, feature("logits", "logits", multiarray([1, 8, 16], ARRAY_FLOAT32)))  # output
        + pb_bytes(100, metadata)                                                           # metadata
    )
    return (
        pb_varint(1, 4)                 # specificationVersion = 4
        + pb_bytes(2, description)      # description
        + pb_bytes(900, b"")            # oneof Type: identity = 900 (empty Identity message)
    )


def gen_mlpackage(d: Path, mlmodel: bytes) -> None:
    ident = str(uuid.uuid5(uuid.NAMESPACE_URL, "modeld-fixtures/tiny.mlpackage/model")).upper()
    manifest = {
        "fileFormatVersion": "1.0.0",
        "itemInfoEntries": {
            ident: {
                "author": "com.apple.CoreML",
                "description": "CoreML Model Specification",
                "name": "model.mlmodel",
                "path": "com.apple.CoreML/model.mlmodel",
            }
        },
        "rootModelIdentifier": ident,
    }
    # Same serialization as coremltools' libmodelpackage (4-space indent, sorted keys).
    write(d / "Manifest.json", (json.dumps(manifest, indent=4, sort_keys=True) + "\n").encode())
    write(d / "Data" / "com.apple.CoreML" / "model.mlmodel", mlmodel)


# --------------------------------------------------------------------------- MLC-LLM

def gen_mlc(d: Path) -> None:
    # q4f16_1: 8 x 4-bit values per uint32, group size 32 -> hidden 8 packs into 1 u32/row.
    q_weight = (np.arange(16, dtype=np.uint32) * 0x11111111).reshape(16, 1).astype("<u4")
    q_scale = np.full((16, 1), 0.0625, dtype="<f2")
    params = q_weight.tobytes() + q_scale.tobytes()
    write(d / "params_shard_0.bin", params)
    records = [
        {"name": "model.embed_tokens.q_weight", "shape": [16, 1], "dtype": "uint32",
         "format": "f32-to-bf16", "nbytes": q_weight.nbytes, "byteOffset": 0},
        {"name": "model.embed_tokens.q_scale", "shape": [16, 1], "dtype": "float16",
         "format": "f32-to-bf16", "nbytes": q_scale.nbytes, "byteOffset": q_weight.nbytes},
    ]
    cache = {
        "metadata": {"ParamSize": 2, "ParamBytes": len(params), "BitsPerParam": 4.5},
        "records": [{
            "dataPath": "params_shard_0.bin",
            "format": "raw-shard",
            "nbytes": len(params),
            "records": records,
            "md5sum": hashlib.md5(params).hexdigest(),
        }],
    }
    write(d / "ndarray-cache.json", jdump(cache))
    cfg = {
        "version": "0.1.0",
        "model_type": "llama",
        "quantization": "q4f16_1",
        "model_config": {
            "hidden_size": 8, "intermediate_size": 16, "num_attention_heads": 2,
            "num_hidden_layers": 1, "num_key_value_heads": 2, "rms_norm_eps": 1e-05,
            "vocab_size": 16, "context_window_size": 256, "prefill_chunk_size": 256,
            "tensor_parallel_shards": 1, "head_dim": 4, "max_batch_size": 1,
        },
        "vocab_size": 16,
        "context_window_size": 256,
        "sliding_window_size": -1,
        "prefill_chunk_size": 256,
        "attention_sink_size": -1,
        "tensor_parallel_shards": 1,
        "pipeline_parallel_stages": 1,
        "temperature": 0.7,
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        "repetition_penalty": 1.0,
        "top_p": 0.95,
        "tokenizer_files": ["tokenizer.json"],
        "tokenizer_info": {"token_postproc_method": "byte_level",
                           "prepend_space_in_encode": False, "strip_space_in_decode": False},
        "conv_template": {
            "name": "chatml",
            "system_template": "<|im_start|>system\n{system_message}<|im_end|>\n",
            "system_message": "You are a helpful assistant.",
            "roles": {"user": "<|im_start|>user", "assistant": "<|im_start|>assistant"},
            "role_templates": {"user": "{user_message}", "assistant": "{assistant_message}"},
            "messages": [],
            "seps": ["<|im_end|>\n"],
            "role_content_sep": "\n",
            "role_empty_sep": "\n",
            "stop_str": ["<|im_end|>"],
            "stop_token_ids": [2, 4],
        },
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    write(d / "mlc-chat-config.json", jdump(cfg))
    write(d / "tokenizer.json", jdump(tokenizer_json()))


# --------------------------------------------------------------------------- archives

def _zinfo(name: str, compress=zipfile.ZIP_DEFLATED, mode=0o644) -> zipfile.ZipInfo:
    zi = zipfile.ZipInfo(name, date_time=ZIP_EPOCH)
    zi.compress_type = compress
    zi.create_system = 3                 # unix
    zi.external_attr = (0o100000 | mode) << 16
    return zi


def zip_bytes(entries: list[tuple[str, bytes]], compress=zipfile.ZIP_DEFLATED) -> bytes:
    bio = io.BytesIO()
    with zipfile.ZipFile(bio, "w", compression=compress, compresslevel=9) as zf:
        for name, data in entries:
            # ZipInfo keeps names verbatim (also "../x" and "/x": wanted for hostile fixtures)
            zf.writestr(_zinfo(name, compress), data)
    return bio.getvalue()


def _tarinfo(name: str, size: int = 0, type_=tarfile.REGTYPE, linkname: str = "",
             mode: int = 0o644) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size = size
    ti.type = type_
    ti.linkname = linkname
    ti.mode = mode
    ti.mtime = 0
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    return ti


def targz_bytes(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for ti, data in members:
            tf.addfile(ti, io.BytesIO(data) if data is not None else None)
    out = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=out, compresslevel=9, mtime=0) as gz:
        gz.write(raw.getvalue())
    return out.getvalue()


def regular(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    return _tarinfo(name, size=len(data)), data


BOMB_SIZE = 200 * 1024 * 1024
MANY_ENTRIES = 5000  # 20000 entries cannot fit in 1 MB: >= 76 + 2*len(name) bytes each


def gen_bomb(path: Path) -> None:
    bio = io.BytesIO()
    with zipfile.ZipFile(bio, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        zi = _zinfo("zeros.bin")
        zi.file_size = BOMB_SIZE
        chunk = b"\0" * (1 << 20)
        with zf.open(zi, "w") as f:
            for _ in range(BOMB_SIZE // len(chunk)):
                f.write(chunk)
    write(path, bio.getvalue())


def gen_many(path: Path) -> None:
    bio = io.BytesIO()
    with zipfile.ZipFile(bio, "w", compression=zipfile.ZIP_STORED) as zf:
        for i in range(MANY_ENTRIES):
            zf.writestr(_zinfo(f"m/{i:05d}", zipfile.ZIP_STORED), b"x")
    write(path, bio.getvalue())


# --------------------------------------------------------------------------- main

NOTES_TXT = (
    b"modeld test fixtures\n"
    b"This is a plain text file. It is not a model and must be classified as 'none'.\n"
)

PLLM_PLACEHOLDER_HEAD = (
    b"modeld fixture: NOT a real picoLLM model. The .pllm header is not publicly\n"
    b"documented, so picoLLM can only be recognised by its .pllm extension.\n"
)

README_TXT = b"Bundle fixture for modeld: models/tiny.gguf is a valid GGUF v3 file.\n"


def prepare_outdir(out: Path) -> None:
    if out.exists():
        if not out.is_dir():
            sys.exit(f"gen-fixtures: {out} exists and is not a directory")
        if any(out.iterdir()):
            manifest = out / "MANIFEST.json"
            try:
                ours = json.loads(manifest.read_text()).get("generator") == GENERATOR_MARK
            except (OSError, ValueError):
                ours = False
            if not ours:
                sys.exit(f"gen-fixtures: refusing to overwrite non-empty {out} "
                         "(no MANIFEST.json from this generator)")
            shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


# --------------------------------------------------------------------------- hostile models

def tiny_genai_config() -> dict:
    return {"model": {"type": "llama", "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2,
                      "context_length": 256, "vocab_size": 16,
                      "decoder": {"filename": "model.onnx", "head_size": 4, "hidden_size": 8,
                                  "num_attention_heads": 2, "num_key_value_heads": 2,
                                  "num_hidden_layers": 1}}}


def gen_onnx_escape(d: Path) -> None:
    """A decoder export whose one weight claims to live in ../../etc/passwd. ONNX
    Runtime would open that path; the agent must refuse before a session exists."""
    from onnx import TensorProto, helper

    t = TensorProto()
    t.name = "embed_tokens.weight"
    t.data_type = TensorProto.FLOAT
    t.dims.extend([16, 8])
    t.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "../../etc/passwd"), ("offset", "0"), ("length", "512")):
        entry = t.external_data.add()
        entry.key, entry.value = key, value
    node = helper.make_node("Gather", ["embed_tokens.weight", "input_ids"], ["logits"], axis=0)
    graph = helper.make_graph(
        [node], "escape",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", 8])],
        initializer=[t])
    model = helper.make_model(graph, producer_name="modeld-fixtures",
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    # No checker: it would (rightly) refuse the path this fixture exists to carry.
    write(d / "model.onnx", model.SerializeToString())
    write(d / "genai_config.json", jdump(tiny_genai_config()))


def gen_absurd_shapes(d: Path) -> None:
    """A llama directory whose safetensors header gives the embedding a shape of
    2^62 x 2^62 elements over 64 bytes of data: sizing a buffer from it must not
    happen."""
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 16,
              "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
              "num_attention_heads": 2, "num_key_value_heads": 2,
              "max_position_embeddings": 256, "rms_norm_eps": 1e-05,
              "tie_word_embeddings": True, "torch_dtype": "float32"}
    write(d / "config.json", jdump(config))
    header = {"model.embed_tokens.weight": {"dtype": "F32", "shape": [1 << 62, 1 << 62],
                                            "data_offsets": [0, 64]}}
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * ((8 - len(hb) % 8) % 8)
    write(d / "model.safetensors", struct.pack("<Q", len(hb)) + hb + bytes(64))


def gen_absurd_config(d: Path) -> None:
    """A llama directory whose config asks for 2^40 positions and a billion layers:
    a loader that sized its rotary tables or layer list from it would exhaust memory."""
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 16,
              "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1_000_000_000,
              "num_attention_heads": 2, "num_key_value_heads": 2,
              "max_position_embeddings": 1 << 40, "rms_norm_eps": 1e-05,
              "tie_word_embeddings": True, "torch_dtype": "float32"}
    write(d / "config.json", jdump(config))
    tensors = {"model.embed_tokens.weight": np.zeros((16, 8), dtype=np.float32)}
    write(d / "model.safetensors", safetensors_bytes(tensors, {"format": "pt"}))


# --------------------------------------------------------------------------- catalogs

def gen_catalogs(d: Path) -> None:
    """Catalog manifests in each accepted shape: seeds for the catalog fuzz target, and
    valid input for anyone trying ImportCatalog by hand."""
    entry = {
        "id": "tiny-gguf",
        "display_name": "Tiny GGUF fixture",
        "format": "gguf",
        "architecture": "llama",
        "context_length": 64,
        "tokenizer": {"kind": "embedded"},
        "tags": ["fixture", "tiny"],
        "files": [{"name": "tiny.gguf", "urls": ["file:///models/tiny.gguf"],
                   "sha256": hashlib.sha256(b"tiny").hexdigest(), "size_bytes": 1152}],
    }
    archived = {
        "id": "tiny-bundle",
        "format": "gguf",
        "files": [{"name": "bundle.zip", "urls": ["https://models.example.invalid/bundle.zip"],
                   "archive": "zip", "member": "models/tiny.gguf"}],
    }
    write(d / "list.json", jdump([entry, archived]))
    write(d / "wrapped.json", jdump({"name": "fixtures", "description": "two models",
                                     "models": [entry, archived]}))
    # YAML with an anchor and an alias, so the YAML-only paths have a seed too.
    write(d / "anchors.yaml", (
        "name: fixtures\n"
        "models:\n"
        "  - &base\n"
        "    id: tiny-a\n"
        "    format: gguf\n"
        "    tokenizer: {kind: embedded}\n"
        "    files:\n"
        "      - name: tiny.gguf\n"
        "        urls: [\"file:///models/tiny.gguf\"]\n"
        "  - <<: *base\n"
        "    id: tiny-b\n"
    ).encode())


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[1] in ("-h", "--help"):
        print(__doc__.strip(), file=sys.stderr)
        return 2
    out = Path(argv[1])
    prepare_outdir(out)

    # formats: gguf onnx safetensors coreml tflite executorch mlc picollm zip tar_gz none
    expect: dict[str, dict] = {}

    gen_gguf(out / "tiny.gguf")
    expect["tiny.gguf"] = {"format": "gguf"}
    gguf_bytes = (out / "tiny.gguf").read_bytes()

    gen_onnx(out / "tiny.onnx")
    expect["tiny.onnx"] = {"format": "onnx"}

    gen_hf_dir(out / "hf-dir")
    expect["hf-dir/config.json"] = {"format": "none"}
    expect["hf-dir/model.safetensors"] = {"format": "safetensors"}
    expect["hf-dir/tokenizer.json"] = {"format": "none"}

    gen_single_safetensors(out / "single.safetensors")
    expect["single.safetensors"] = {"format": "safetensors"}

    gen_tflite(out / "tiny.tflite")
    expect["tiny.tflite"] = {"format": "tflite"}
    gen_tflite_checks(out / "tflite", expect)

    gen_pte(out / "tiny.pte")
    expect["tiny.pte"] = {"format": "executorch"}

    mlmodel = coreml_model_bytes()
    write(out / "tiny.mlmodel", mlmodel)
    expect["tiny.mlmodel"] = {"format": "coreml"}

    gen_mlpackage(out / "tiny.mlpackage", mlmodel)
    expect["tiny.mlpackage/Manifest.json"] = {"format": "none"}
    expect["tiny.mlpackage/Data/com.apple.CoreML/model.mlmodel"] = {"format": "coreml"}

    gen_mlc(out / "mlc-model")
    expect["mlc-model/mlc-chat-config.json"] = {"format": "mlc"}
    expect["mlc-model/ndarray-cache.json"] = {"format": "none"}
    expect["mlc-model/params_shard_0.bin"] = {"format": "none"}
    expect["mlc-model/tokenizer.json"] = {"format": "none"}

    write(out / "tiny.pllm", PLLM_PLACEHOLDER_HEAD + det_bytes("tiny.pllm", 4096))
    expect["tiny.pllm"] = {"format": "picollm", "detection": "extension-only",
                           "note": "placeholder bytes; no public .pllm magic number"}

    write(out / "bundle.zip", zip_bytes([("README.txt", README_TXT), ("models/tiny.gguf", gguf_bytes)]))
    expect["bundle.zip"] = {"format": "zip", "contains": {"models/tiny.gguf": "gguf"}}

    write(out / "bundle.tar.gz", targz_bytes([regular("notes.txt", NOTES_TXT),
                                               regular("tiny.gguf", gguf_bytes)]))
    expect["bundle.tar.gz"] = {"format": "tar_gz", "contains": {"tiny.gguf": "gguf"}}

    write(out / "not-a-model.bin", det_bytes("not-a-model.bin", 65536))
    expect["not-a-model.bin"] = {"format": "none"}
    write(out / "notes.txt", NOTES_TXT)
    expect["notes.txt"] = {"format": "none"}
    write(out / "truncated.gguf", gguf_bytes[:10])
    expect["truncated.gguf"] = {"format": "none", "note": "GGUF magic + 6 bytes only: truncated "
                                "header (< 24 bytes); must not be reported as a valid gguf"}

    gen_corrupt_ggufs(out / "corrupt", out / "tiny.gguf", expect)

    gen_catalogs(out / "catalogs")
    for name in ("list.json", "wrapped.json", "anchors.yaml"):
        expect[f"catalogs/{name}"] = {"format": "none", "note": "a catalog manifest"}

    hm = out / "hostile-models"
    gen_onnx_escape(hm / "onnx-escape")
    expect["hostile-models/onnx-escape/model.onnx"] = {"format": "onnx", "hostile":
        "initializer external data location '../../etc/passwd'"}
    expect["hostile-models/onnx-escape/genai_config.json"] = {"format": "none"}
    gen_absurd_shapes(hm / "absurd-shapes")
    expect["hostile-models/absurd-shapes/config.json"] = {"format": "none"}
    expect["hostile-models/absurd-shapes/model.safetensors"] = {"format": "none", "hostile":
        "tensor shape [2^62, 2^62] over 64 bytes of data"}
    gen_absurd_config(hm / "absurd-config")
    expect["hostile-models/absurd-config/config.json"] = {"format": "none", "hostile":
        "num_hidden_layers 1e9, max_position_embeddings 2^40"}
    expect["hostile-models/absurd-config/model.safetensors"] = {"format": "safetensors"}

    h = out / "hostile"
    write(h / "zip-slip.zip", zip_bytes([("ok.txt", b"ok\n"), ("../../evil.txt", b"zip-slip\n")]))
    expect["hostile/zip-slip.zip"] = {"format": "zip", "hostile": "entry '../../evil.txt' escapes the target dir"}
    write(h / "absolute.zip", zip_bytes([("ok.txt", b"ok\n"), ("/tmp/evil-abs.txt", b"absolute\n")]))
    expect["hostile/absolute.zip"] = {"format": "zip", "hostile": "absolute entry '/tmp/evil-abs.txt'"}
    write(h / "symlink.tar.gz", targz_bytes([
        regular("ok.txt", b"ok\n"),
        (_tarinfo("passwd-link", type_=tarfile.SYMTYPE, linkname="/etc/passwd", mode=0o777), None),
        (_tarinfo("escape", type_=tarfile.SYMTYPE, linkname="../../../../tmp", mode=0o777), None),
        regular("escape/evil-via-symlink.txt", b"written through a symlinked dir\n"),
    ]))
    expect["hostile/symlink.tar.gz"] = {"format": "tar_gz", "hostile":
        "symlink 'passwd-link' -> /etc/passwd; symlink 'escape' -> ../../../../tmp then file "
        "'escape/evil-via-symlink.txt' written through it"}
    write(h / "hardlink.tar.gz", targz_bytes([
        regular("ok.txt", b"ok\n"),
        (_tarinfo("passwd-hardlink", type_=tarfile.LNKTYPE, linkname="/etc/passwd"), None),
        (_tarinfo("outside-hardlink", type_=tarfile.LNKTYPE, linkname="../../outside.txt"), None),
    ]))
    expect["hostile/hardlink.tar.gz"] = {"format": "tar_gz", "hostile":
        "hardlink 'passwd-hardlink' -> /etc/passwd and 'outside-hardlink' -> ../../outside.txt"}
    gen_bomb(h / "bomb.zip")
    expect["hostile/bomb.zip"] = {"format": "zip", "hostile":
        f"single entry 'zeros.bin' of {BOMB_SIZE} zero bytes, deflated"}
    gen_many(h / "many-entries.zip")
    expect["hostile/many-entries.zip"] = {"format": "zip", "hostile":
        f"{MANY_ENTRIES} one-byte stored entries m/00000..m/{MANY_ENTRIES - 1:05d} "
        "(20000 cannot fit in < 1 MB)"}

    files = []
    for p in sorted(out.rglob("*")):
        if not p.is_file() or p == out / "MANIFEST.json":
            continue
        rel = p.relative_to(out).as_posix()
        if rel not in expect:
            raise SystemExit(f"gen-fixtures: no expectation recorded for {rel}")
        data = p.read_bytes()
        if len(data) >= 1024 * 1024:
            raise SystemExit(f"gen-fixtures: {rel} is {len(data)} bytes (must be < 1 MB)")
        files.append({"path": rel, "size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                      **expect[rel]})
    missing = set(expect) - {f["path"] for f in files}
    if missing:
        raise SystemExit(f"gen-fixtures: expected files not written: {sorted(missing)}")

    manifest = {
        "generator": GENERATOR_MARK,
        "formats": ["gguf", "onnx", "safetensors", "coreml", "tflite", "executorch", "mlc",
                    "picollm", "zip", "tar_gz", "none"],
        "directories": [
            {"path": "hf-dir", "format": "safetensors", "layout": "huggingface"},
            {"path": "mlc-model", "format": "mlc"},
            {"path": "tiny.mlpackage", "format": "coreml", "layout": "mlpackage"},
        ],
        "files": files,
    }
    write(out / "MANIFEST.json", jdump(manifest))
    print(f"gen-fixtures: wrote {len(files)} files to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
