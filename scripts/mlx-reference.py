#!/usr/bin/env python3
"""Run an MLX model with mlx-lm, as the reference modeld's MLX support is held to.

Usage: mlx-reference.py MODEL_DIR PROMPTS_JSON MAX_TOKENS

PROMPTS_JSON is a list of [text, is_chat] pairs. For each prompt this prints (one JSON
list on stdout) the prompt's token ids as mlx-lm's tokenizer makes them (a chat
prompt through the model's chat template, with the assistant's turn opened), up to
MAX_TOKENS greedy tokens (stopping after an end-of-generation token), and the logits
of the first step (the prompt's last position).

The model is the one on disk, computed in float32: its bfloat16 or float16 norms,
scales and biases are widened exactly, so the comparison measures modeld's
arithmetic against MLX's rather than half-precision rounding. The packed weights
are MLX's, untouched. Needs mlx (mlx[cpu] on Linux) and mlx-lm.
"""

import json
import sys

import mlx.core as mx
from mlx.utils import tree_map
from mlx_lm import load
from mlx_lm.models.cache import make_prompt_cache


def main() -> None:
    model_dir, prompts, max_tokens = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
    model, tokenizer = load(model_dir)
    widen = lambda p: p.astype(mx.float32) if p.dtype in (mx.bfloat16, mx.float16) else p
    model.update(tree_map(widen, model.parameters()))
    end = set(tokenizer.eos_token_ids)
    out = []
    for text, chat in prompts:
        if chat:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                add_generation_prompt=True, tokenize=True)
            if isinstance(ids, dict):
                ids = ids["input_ids"]
        else:
            ids = tokenizer.encode(text)
        ids = [int(i) for i in ids]
        cache = make_prompt_cache(model)
        logits = model(mx.array([ids]), cache=cache)[0, -1].astype(mx.float32)
        first = logits.tolist()
        greedy = []
        while len(greedy) < max_tokens:
            token = int(mx.argmax(logits).item())
            greedy.append(token)
            if token in end:
                break
            logits = model(mx.array([[token]]), cache=cache)[0, -1].astype(mx.float32)
        out.append({"ids": ids, "greedy": greedy, "logits": first})
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
