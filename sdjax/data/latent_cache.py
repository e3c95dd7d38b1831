"""The latent cache: the dataset encoded once by the frozen VAE, so that training skips the encoder. This
module reads it and defines its format; the writer behind `sdjax cache-latents` is sdjax/cache_latents.py.

`sdjax cache-latents --config C --out DIR` stores, per usable record, the VAE posterior's mean and std
(float32, channels-last) of the centre-cropped image and the token ids of all its captions, in array_record
shards `DIR/latents-PPPPP-of-NNNNN.array_record` (one per process, random access) beside `DIR/cache.json`.
Bad records are skipped and counted while caching, so the cache holds good records only.

Training with `data.latent_cache=DIR` reads these instead of images. The step samples
`mean + std * normal(rng)` with the rng it would have used to encode the image, and the caption is chosen
and dropped out with the same per-element rng as from images: the same batch gives the same loss.
Captions are cached as token ids, not text-encoder outputs: the caption is picked (and dropped) per step.
"""

from __future__ import annotations

import io
import json
import os

import grain
import ml_collections
import numpy as np

from sdjax.data.preprocess import caption_index, drops_caption, tokenize
from sdjax.data.records import DataError

METADATA = "cache.json"
FORMAT_VERSION = 1
# Settings that change what is cached: training from a cache written with other values would be wrong.
CACHED_SETTINGS = ("resolution", "max_length", "min_image_size", "caption_column")


def shard_name(process_index: int, process_count: int) -> str:
    return f"latents-{process_index:05d}-of-{process_count:05d}.array_record"


def cache_settings(config: ml_collections.ConfigDict) -> dict:
    return {"model.pretrained": os.path.realpath(config.model.pretrained),
            **{f"data.{key}": config.data[key] for key in CACHED_SETTINGS}}


def serialize_record(record: dict) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **record)
    return buffer.getvalue()


def deserialize_record(data: bytes) -> dict:
    with np.load(io.BytesIO(data)) as arrays:
        return dict(arrays)


# --- reading ----------------------------------------------------------------------------------------


class CachedLatentsSource:
    """Random access to cached {latent_mean, latent_std, input_ids [num_captions, L]} records."""

    def __init__(self, cache_dir: str, config: ml_collections.ConfigDict):
        metadata_path = os.path.join(cache_dir, METADATA)
        try:
            with open(metadata_path) as f:
                metadata = json.load(f)
        except FileNotFoundError:
            raise DataError(f"data.latent_cache={cache_dir!r} holds no {METADATA}: write the cache first with "
                            "`sdjax cache-latents --config ... --out DIR`.") from None
        expected = cache_settings(config)
        for key, value in metadata["settings"].items():
            if expected.get(key) != value:
                raise DataError(f"the latent cache {cache_dir} was written with {key}={value!r}, but this run has "
                                f"{key}={expected.get(key)!r}; write a new cache or change the config back.")
        paths = [os.path.join(cache_dir, name) for name in metadata["shards"]]
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise DataError(f"the latent cache {cache_dir} lacks {missing[0]}: `sdjax cache-latents` did not finish "
                            "on every process.")
        self.cache_dir = cache_dir
        self.source = grain.sources.ArrayRecordDataSource(paths)
        if not len(self.source):
            raise DataError(f"the latent cache {cache_dir} holds no records.")

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        return deserialize_record(self.source[index])

    def __repr__(self) -> str:
        return f"CachedLatentsSource({self.cache_dir!r})"


def make_cached_preprocess(config: ml_collections.ConfigDict, tokenizer):
    """(record, rng) -> {latent_mean, latent_std, input_ids, skipped}: the caption picked and dropped out
    with the same draws from `rng` as preprocess.make_preprocess makes from images."""
    data = config.data
    empty_caption = tokenize(tokenizer, "", data.max_length)

    def preprocess(record: dict, rng: np.random.Generator) -> dict:
        captions = record["input_ids"]
        input_ids = captions[caption_index(len(captions), rng)]
        if drops_caption(data.caption_dropout, rng):
            input_ids = empty_caption
        return {"latent_mean": record["latent_mean"], "latent_std": record["latent_std"], "input_ids": input_ids,
                "skipped": np.int32(0)}

    return preprocess
