"""A CLIP tokenizer that needs no download, for configs without a pretrained folder (demo, tests).

It is a real `CLIPTokenizer` (same byte-level BPE code, same special tokens, same 77-token padding) over a
small vocabulary: all 256 byte symbols, so any text round-trips, plus merges that make each word of
`CAPTION_WORDS` one token. Pretrained runs use the folder's own tokenizer instead. SDXL's two tokenizers
are one `TokenizerPair`.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
from types import SimpleNamespace

import numpy as np
from transformers import CLIPTokenizer

# Frequent caption words; the demo dataset's captions use only these (colours, shapes, places).
CAPTION_WORDS = (
    "a an the of on in at and with photo picture image drawing painting small big large "
    "red green blue yellow orange purple pink white black gray brown cyan "
    "circle square triangle ring cross star shape background "
    "left right top bottom center middle corner"
).split()


def bytes_to_unicode() -> dict[int, str]:
    """Byte -> the printable character CLIP's byte-level BPE writes it as (GPT-2's table: printable bytes as
    themselves, the others shifted past 255). transformers 5 no longer exports its copy."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
                 *range(ord("\u00ae"), ord("\u00ff") + 1)]
    shifted = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(shifted)}}


def _apply_merges(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair encoding of `word` (characters, last one with `</w>`): merge the lowest-ranked adjacent pair
    until none has a rank, as CLIPTokenizer.bpe does."""
    symbols = list(word[:-1]) + [word[-1] + "</w>"]
    while len(symbols) > 1:
        pairs = [(ranks.get(pair, len(ranks)), i) for i, pair in enumerate(zip(symbols, symbols[1:]))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
    return symbols


def caption_word_merges(words=CAPTION_WORDS) -> list[tuple[str, str]]:
    """Merges, in rank order, under which each of `words` is one token. Each word's missing merges are ranked
    after all earlier ones, so they never fire inside an earlier word (whose own merges always rank lower)
    and the earlier words stay one token. (Building each word left to right on its own is not enough: "red"
    ranks (r, e) first, and "green" then splits as g|re|e|n.)"""
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        symbols = _apply_merges(word, ranks)
        while len(symbols) > 1:
            ranks[(symbols[0], symbols[1])] = len(ranks)
            symbols = _apply_merges(word, ranks)
    return list(ranks)


@functools.lru_cache(maxsize=None)
def builtin_tokenizer(max_length: int = 77) -> CLIPTokenizer:
    byte_symbols = list(bytes_to_unicode().values())
    vocab = byte_symbols + [s + "</w>" for s in byte_symbols]
    merges = caption_word_merges()
    vocab += ["".join(merge) for merge in merges] + ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as folder:
        vocab_file, merges_file = os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")
        with open(vocab_file, "w", encoding="utf-8") as f:
            json.dump({token: i for i, token in enumerate(dict.fromkeys(vocab))}, f)
        with open(merges_file, "w", encoding="utf-8") as f:
            f.write("#version: sdjax-builtin\n" + "\n".join(" ".join(m) for m in merges) + "\n")
        # From the folder, as a pretrained tokenizer loads: the constructor's arguments differ between
        # transformers 4 (file paths) and 5 (the vocabulary and merges themselves).
        return CLIPTokenizer.from_pretrained(folder, model_max_length=max_length)


def save_tokenizer(tokenizer: CLIPTokenizer, folder: str) -> None:
    """`tokenizer` in `folder` as every transformers release reads it: transformers 5 saves `tokenizer.json`
    only, which transformers 4's CLIPTokenizer cannot read; its BPE model writes `vocab.json` and `merges.txt`."""
    tokenizer.save_pretrained(folder)
    if not os.path.isfile(os.path.join(folder, "vocab.json")):
        tokenizer.backend_tokenizer.model.save(folder)


class TokenizerPair:
    """SDXL's two tokenizers (CLIP ViT-L's and OpenCLIP ViT-bigG's) as one: called like a CLIPTokenizer, it
    gives both token ids of each text side by side, `input_ids` [..., 2, max_length], so the data pipeline,
    the latent cache and the sampler pass SDXL captions as they pass SD's (`text_conditioning` splits them)."""

    def __init__(self, first: CLIPTokenizer, second: CLIPTokenizer):
        self.first, self.second = first, second

    def __call__(self, text, **kwargs) -> SimpleNamespace:
        ids = [np.asarray(tokenizer(text, **kwargs).input_ids, np.int32) for tokenizer in (self.first, self.second)]
        return SimpleNamespace(input_ids=np.stack(ids, axis=-2))

    def __len__(self) -> int:
        return max(len(self.first), len(self.second))
