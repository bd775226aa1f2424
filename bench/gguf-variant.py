#!/usr/bin/env python3
"""Writes a variant of a GGUF file with a new digest, for rollout benchmarks.

  gguf-variant.py SRC DST renamed   same weights, one letter of general.name changed:
                                    a new revision that answers as the original does
  gguf-variant.py SRC DST broken    the token embeddings zeroed: a file that loads and
                                    answers, but badly (a bad quantization, say)
"""
import shutil
import sys

from gguf import GGUFReader


def main() -> None:
    src, dst, kind = sys.argv[1:4]
    shutil.copyfile(src, dst)
    reader = GGUFReader(dst, "r+")
    if kind == "renamed":
        field = reader.fields["general.name"]
        name = field.parts[field.data[0]]
        name[-1] = ord("Y") if name[-1] == ord("X") else ord("X")
    elif kind == "broken":
        embeddings = next(t for t in reader.tensors if t.name == "token_embd.weight")
        embeddings.data[...] = 0
    else:
        sys.exit(f"unknown variant {kind!r}: renamed or broken")
    reader.data.flush()


if __name__ == "__main__":
    main()
