#!/usr/bin/env python3
"""Run a LiteRT-LM bundle (.litertlm) with LiteRT-LM's own runtime, the second route a
TFLite decoder can take: what modeld's LiteRT engine is compared with.

Usage: litertlm-reference.py BUNDLE_DIR PROMPTS_JSON MAX_TOKENS

PROMPTS_JSON is a list of [text, is_chat] pairs. A chat prompt goes through a
conversation (the bundle's own chat template); a raw prompt through a session without
a template. For each prompt this prints (one JSON list on stdout) the prompt's token
ids as LiteRT-LM's tokenizer makes them (a chat prompt rendered with the bundle's
template, the assistant's turn opened), the text of up to MAX_TOKENS greedy tokens
(the bundle's sampler: top-p over the single best token), and what LiteRT-LM measured:
time to first token and prefill and decode tokens/s.

LiteRT-LM writes its weight caches to a temporary directory, never beside the bundle.
Needs litert-lm-api.
"""

import json
import sys
import tempfile
from pathlib import Path

import litert_lm


def measured(info) -> dict:
    return {
        "time_to_first_token_s": info.time_to_first_token_in_second,
        "prefill_tokens_per_second": info.last_prefill_tokens_per_second,
        "decode_tokens_per_second": info.last_decode_tokens_per_second,
    }


def main() -> None:
    bundle_dir, prompts, max_tokens = Path(sys.argv[1]), json.loads(sys.argv[2]), int(sys.argv[3])
    litert_lm.set_min_log_severity(litert_lm.LogSeverity.ERROR)
    template = json.loads((bundle_dir / "tokenizer_config.json").read_text())["chat_template"]
    import jinja2

    render = jinja2.Environment().from_string(template)
    out = []
    with tempfile.TemporaryDirectory() as cache:
        engine = litert_lm.Engine(str(bundle_dir / "model.litertlm"),
                                  backend=litert_lm.Backend.CPU(), max_num_tokens=1024,
                                  enable_benchmark=True, cache_dir=cache)
        for text, chat in prompts:
            if chat:
                rendered = render.render(messages=[{"role": "user", "content": text}],
                                         add_generation_prompt=True)
                conversation = engine.create_conversation(max_output_tokens=max_tokens)
                reply = conversation.send_message(text)
                answer = reply["content"][0]["text"]
                info = conversation.get_benchmark_info()
            else:
                rendered = text
                session = engine.create_session(apply_prompt_template=False,
                                                max_output_tokens=max_tokens)
                session.run_prefill([text])
                answer = session.run_decode().texts[0]
                info = session.get_benchmark_info()
            out.append({"ids": [int(i) for i in engine.tokenize(rendered)], "text": answer,
                        **measured(info)})
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
