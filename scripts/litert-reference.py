#!/usr/bin/env python3
"""Run a TFLite decoder with LiteRT's Python interpreter, as the reference modeld's
LiteRT engine is held to.

Usage: litert-reference.py TFLITE_DIR PROMPTS_JSON MAX_TOKENS

PROMPTS_JSON is a list of [text, is_chat] pairs. For each prompt this prints (one JSON
list on stdout) the prompt's token ids as the Hugging Face tokenizer beside the model
makes them (a chat prompt through its chat template, with the assistant's turn
opened), up to MAX_TOKENS greedy tokens (stopping after an end-of-generation token),
and the logits of the first step (the prompt's last position).

The prompt goes through the `decode` signature one token at a time, so the reference
does not share modeld's prefill path (a padded block through `prefill`); the caches
of one call are fed to the next, as scripts/derive-models.py's TfliteDecoder does.
Needs ai-edge-litert and transformers.
"""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
from transformers import AutoTokenizer


def derive_models():
    path = Path(__file__).with_name("derive-models.py")
    spec = importlib.util.spec_from_file_location("derive_models", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    model_dir, prompts, max_tokens = Path(sys.argv[1]), json.loads(sys.argv[2]), int(sys.argv[3])
    config = json.loads((model_dir / "config.json").read_text())
    hp = {"n_layer": config["num_hidden_layers"], "n_kv_head": config["num_key_value_heads"],
          "head_dim": config["head_dim"]}
    decoder = derive_models().TfliteDecoder(model_dir, hp)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    generation = json.loads((model_dir / "generation_config.json").read_text())
    end = generation.get("eos_token_id", tokenizer.eos_token_id)
    end = set(end if isinstance(end, list) else [end])
    out = []
    for text, chat in prompts:
        if chat:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                add_generation_prompt=True, tokenize=True)
            if hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding
                ids = ids["input_ids"]
        else:
            ids = tokenizer.encode(text)
        ids = [int(i) for i in ids]
        cache = decoder.empty_cache()
        for position, token in enumerate(ids):
            logits, cache = decoder.step(decoder.decode, [token], position, cache)
        logits = logits[-1]
        first = logits.astype(np.float32).tolist()
        greedy = []
        while len(greedy) < max_tokens:
            token = int(np.argmax(logits))
            greedy.append(token)
            if token in end:
                break
            logits, cache = decoder.step(decoder.decode, [token], len(ids) + len(greedy) - 1,
                                         cache)
            logits = logits[-1]
        out.append({"ids": ids, "greedy": greedy, "logits": first})
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
