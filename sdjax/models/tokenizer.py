"""A CLIP tokenizer that needs no download, for configs without a pretrained folder (demo, tests).

It is a real `CLIPTokenizer` (same byte-level BPE code, same special tokens, same 77-token padding) over a
small vocabulary: all 256 byte symbols, so any text round-trips, plus merges that make each word of
`CAPTION_WORDS` one token. Pretrained runs use the folder's own tokenizer instead.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile

from transformers import CLIPTokenizer
from transformers.models.clip.tokenization_clip import bytes_to_unicode

# Frequent caption words; the demo dataset's captions use only these (colours, shapes, places).
CAPTION_WORDS = (
    "a an the of on in at and with photo picture image drawing painting small big large "
    "red green blue yellow orange purple pink white black gray brown cyan "
    "circle square triangle ring cross star shape background "
    "left right top bottom center middle corner"
).split()


def _merges_for_word(word: str) -> list[tuple[str, str]]:
    """Left-to-right merges that build `word</w>` from its characters."""
    symbols = list(word[:-1]) + [word[-1] + "</w>"]
    merges, current = [], symbols[0]
    for symbol in symbols[1:]:
        merges.append((current, symbol))
        current += symbol
    return merges


@functools.lru_cache(maxsize=None)
def builtin_tokenizer(max_length: int = 77) -> CLIPTokenizer:
    byte_symbols = list(bytes_to_unicode().values())
    vocab = byte_symbols + [s + "</w>" for s in byte_symbols]
    merges: list[tuple[str, str]] = []
    for word in CAPTION_WORDS:
        for merge in _merges_for_word(word):
            if merge not in merges:
                merges.append(merge)
                vocab.append("".join(merge))
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as folder:
        vocab_file, merges_file = os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")
        with open(vocab_file, "w", encoding="utf-8") as f:
            json.dump({token: i for i, token in enumerate(dict.fromkeys(vocab))}, f)
        with open(merges_file, "w", encoding="utf-8") as f:
            f.write("#version: sdjax-builtin\n" + "\n".join(" ".join(m) for m in merges) + "\n")
        return CLIPTokenizer(vocab_file, merges_file, model_max_length=max_length)
