"""The latent cache: the dataset encoded once by the frozen VAE (and, if asked, the frozen text encoders), so
that training skips them. This module reads it and defines its format; the writer behind `sdjax cache-latents`
is sdjax/cache_latents.py.

`sdjax cache-latents --config C --out DIR` (DIR local or `gs://...`) stores, per usable record, in array_record
shards `DIR/latents-PPPPP-of-NNNNN.array_record` (one per process, random access):
  latent_mean, latent_std  the VAE posterior of the centre-cropped image, float32, channels-last;
  time_ids                 SDXL's size and crop conditioning of that crop [6] (preprocess.Crop.time_ids);
  input_ids                the token ids of every caption [num_captions, (2,) L];
and with `data.cache_text_states=True`, the text encoders' outputs for every caption, in the dtype the step
conditions on them (train.precision: bfloat16 halves their size, and a bf16 step computes them in bf16 anyway):
  encoder_hidden_states    [num_captions, L, D] (SDXL: both encoders' penultimate states side by side);
  text_embeds              SDXL: the second encoder's pooled projection [num_captions, P].
The empty caption's states (caption dropout's) are the same for every record: stored once, `DIR/empty_caption.npz`.
`DIR/cache.json` is written last, once every shard is complete: it names the shards and their record counts,
the settings and the models (VAE, tokenizers, text encoders: path and fingerprint) that made the cache.
Bad records are skipped and counted while caching, so the cache holds good records only.

Training with `data.latent_cache=DIR` reads these instead of images: the step samples `mean + std *
normal(rng)` with the rng it would have used to encode the image, and the caption is chosen and dropped out
with the same per-element draws as from images, so the same batch gives the same loss. With
`data.cache_text_states=True` the batch carries the chosen caption's states instead of its token ids and the
step runs the UNet alone (sdjax/step.py).

A cache in a bucket is read where it lies: array_record's reader opens `gs://` paths itself (its C++ GCS
client: one ranged read per record; credentials from the environment as every Google client finds them).
"""

from __future__ import annotations

import hashlib
import io
import json
import os

import grain
import ml_collections
import ml_dtypes
import numpy as np

import sdjax.data.files as files
from sdjax.data.preprocess import caption_index, drops_caption, tokenize
from sdjax.data.records import DataError

METADATA = "cache.json"
EMPTY_CAPTION = "empty_caption.npz"
FORMAT_VERSION = 2  # 2: time_ids, text states, model fingerprints, cache.json written last
# Settings that change what is cached: training from a cache written with other values would be wrong.
CACHED_SETTINGS = ("resolution", "max_length", "min_image_size", "caption_column")
TEXT_STATE_FIELDS = ("encoder_hidden_states", "text_embeds")


def shard_name(process_index: int, process_count: int) -> str:
    return f"latents-{process_index:05d}-of-{process_count:05d}.array_record"


def cache_settings(config: ml_collections.ConfigDict, text_states: bool) -> dict:
    """The settings a cache's records depend on; with text states also train.precision (their dtype)."""
    settings = {f"data.{key}": config.data[key] for key in CACHED_SETTINGS}
    if text_states:
        settings["train.precision"] = config.train.precision
    return settings


# --- which models made a cache ----------------------------------------------------------------------

_FINGERPRINT_CHUNK = 1 << 20


def folder_fingerprint(folder: str) -> str:
    """A short hash of a model folder's files (name, size, and content: all of a small file such as
    config.json, the first, middle and last MiB of a weights file): other weights or another config give
    another fingerprint, and hashing a 3 GB text encoder reads 3 MiB of it."""
    digest = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        size = os.path.getsize(path)
        digest.update(f"{name}\0{size}\0".encode())
        with open(path, "rb") as f:
            if size <= 3 * _FINGERPRINT_CHUNK:
                digest.update(f.read())
                continue
            for offset in (0, size // 2, size - _FINGERPRINT_CHUNK):
                f.seek(offset)
                digest.update(f.read(_FINGERPRINT_CHUNK))
    return digest.hexdigest()[:16]


def cached_components(config: ml_collections.ConfigDict, text_states: bool) -> tuple[str, ...]:
    """The folders of model.pretrained that a cache's records depend on: the VAE and the tokenizer(s) (token
    ids), and with text states the text encoder(s)."""
    sdxl = os.path.isdir(os.path.join(config.model.pretrained, "text_encoder_2"))
    names = ("vae", "tokenizer") + (("tokenizer_2",) if sdxl else ())
    if text_states:
        names += ("text_encoder",) + (("text_encoder_2",) if sdxl else ())
    return names


def model_identities(config: ml_collections.ConfigDict, text_states: bool) -> dict:
    """{component: {path, fingerprint}} of the models in `model.pretrained` a cache depends on."""
    identities = {}
    for name in cached_components(config, text_states):
        folder = os.path.join(config.model.pretrained, name)
        if not os.path.isdir(folder):
            raise DataError(f"model.pretrained={config.model.pretrained!r} has no {name}/ folder, which the "
                            "latent cache depends on.")
        identities[name] = {"path": os.path.realpath(folder), "fingerprint": folder_fingerprint(folder)}
    return identities


# --- records ----------------------------------------------------------------------------------------


def serialize_record(record: dict) -> bytes:
    """npz bytes of a dict of arrays; bfloat16 (which npz cannot name) is stored as its bits, `KEY@bfloat16`."""
    arrays = {(f"{k}@bfloat16" if v.dtype == ml_dtypes.bfloat16 else k):
              (v.view(np.uint16) if v.dtype == ml_dtypes.bfloat16 else v) for k, v in record.items()}
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def deserialize_record(data: bytes) -> dict:
    with np.load(io.BytesIO(data)) as arrays:
        return {k.removesuffix("@bfloat16"): arrays[k].view(ml_dtypes.bfloat16) if k.endswith("@bfloat16")
                else arrays[k] for k in arrays.files}


# --- reading ----------------------------------------------------------------------------------------


def read_metadata(cache_dir: str) -> dict:
    """cache.json of a complete cache, or a DataError saying why there is none."""
    path = files.join(cache_dir, METADATA)
    if not files.isfile(path):
        shards = [n for n in (files.listdir(cache_dir) if files.isdir(cache_dir) else []) if n.startswith("latents-")]
        why = (f"it holds {len(shards)} shard(s) but no {METADATA}: `sdjax cache-latents` was cut off before every "
               "process finished (cache.json is written last); run it again" if shards else
               f"it holds no {METADATA}: write the cache first with `sdjax cache-latents --config ... --out DIR`")
        raise DataError(f"data.latent_cache={cache_dir!r} is not a complete latent cache: {why}.")
    metadata = json.loads(files.read_text(path))
    if metadata.get("format") != FORMAT_VERSION:
        raise DataError(f"the latent cache {cache_dir} is in format {metadata.get('format')}, this sdjax reads "
                        f"format {FORMAT_VERSION}: write it again with `sdjax cache-latents`.")
    return metadata


def check_cache_matches(cache_dir: str, metadata: dict, config: ml_collections.ConfigDict) -> None:
    """DataError unless the cache was made with this run's settings and models, naming the first that differs.
    A model is the same when its fingerprint is (a copy of the folder elsewhere is the same model)."""
    text_states = metadata["text_states"]
    if config.data.get("cache_text_states") and not text_states:
        raise DataError(f"data.cache_text_states=True, but the latent cache {cache_dir} holds no text states: "
                        "write one with `sdjax cache-latents --config.data.cache_text_states=True`, or set "
                        "data.cache_text_states=False (the text encoder then runs in the step).")
    expected = cache_settings(config, text_states)
    for key, value in metadata["settings"].items():
        if expected.get(key) != value:
            raise DataError(f"the latent cache {cache_dir} was written with {key}={value!r}, but this run has "
                            f"{key}={expected.get(key)!r}; write a new cache or change the config back.")
    if not config.model.pretrained:
        raise DataError(f"the latent cache {cache_dir} was made by the models of a pretrained folder "
                        f"({metadata['models']['vae']['path']}), but this run has no model.pretrained.")
    ours = model_identities(config, text_states)
    for name, made_by in metadata["models"].items():
        if ours[name]["fingerprint"] != made_by["fingerprint"]:
            raise DataError(f"the latent cache {cache_dir} was made by {name} {made_by['path']} (fingerprint "
                            f"{made_by['fingerprint']}), this run uses {name} {ours[name]['path']} (fingerprint "
                            f"{ours[name]['fingerprint']}); write a new cache with this model.pretrained, or set "
                            "model.pretrained to the one that made it.")


def shard_paths(cache_dir: str, metadata: dict) -> list[str]:
    """The shards cache.json names, as `path[0:records]` (array_record's range syntax: no shard is opened
    until a record of it is read); DataError naming the first that is missing."""
    present = set(files.listdir(cache_dir))
    for name in metadata["shards"]:
        if name not in present:
            raise DataError(f"the latent cache {cache_dir} lacks its shard {files.join(cache_dir, name)} (cache.json "
                            f"names {len(metadata['shards'])}): it was deleted or not copied; write the cache again.")
    return [f"{files.join(cache_dir, name)}[0:{count}]"
            for name, count in zip(metadata["shards"], metadata["shard_records"])]


def _point_array_record_at_emulator() -> None:
    """array_record's C++ GCS client reads CLOUD_STORAGE_EMULATOR_ENDPOINT, the Python clients (gcsfs)
    STORAGE_EMULATOR_HOST: a process pointed at a GCS emulator points both."""
    if "STORAGE_EMULATOR_HOST" in os.environ:
        os.environ["CLOUD_STORAGE_EMULATOR_ENDPOINT"] = os.environ["STORAGE_EMULATOR_HOST"]


class CachedLatentsSource:
    """Random access to cached records {latent_mean, latent_std, time_ids, input_ids [num_captions, ...], and
    with text states encoder_hidden_states (+ text_embeds) [num_captions, ...]}."""

    def __init__(self, cache_dir: str, config: ml_collections.ConfigDict):
        metadata = read_metadata(cache_dir)
        check_cache_matches(cache_dir, metadata, config)
        paths = shard_paths(cache_dir, metadata)
        if not metadata["records"]:
            raise DataError(f"the latent cache {cache_dir} holds no records.")
        if files.is_remote(cache_dir):
            _point_array_record_at_emulator()
        self.cache_dir = cache_dir
        self.metadata = metadata
        self.source = grain.sources.ArrayRecordDataSource(paths)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        return deserialize_record(self.source[index])

    def __repr__(self) -> str:
        return f"CachedLatentsSource({self.cache_dir!r})"


def make_cached_preprocess(config: ml_collections.ConfigDict, tokenizer):
    """(record, rng) -> {latent_mean, latent_std, time_ids, skipped, and the caption: input_ids, or with
    data.cache_text_states its encoder_hidden_states (+ text_embeds)}: the caption picked and dropped out with
    the same draws from `rng` as preprocess.make_preprocess makes from images."""
    data = config.data
    text_states = data.get("cache_text_states", False)  # .get: configs saved before the key
    fields = TEXT_STATE_FIELDS if text_states else ("input_ids",)
    if text_states:
        empty = deserialize_record(files.read_bytes(files.join(data.latent_cache, EMPTY_CAPTION)))
    else:
        empty = {"input_ids": tokenize(tokenizer, "", data.max_length)}

    def preprocess(record: dict, rng: np.random.Generator) -> dict:
        index = caption_index(len(record["input_ids"]), rng)
        dropped = drops_caption(data.caption_dropout, rng)
        caption = {k: empty[k] if dropped else record[k][index] for k in fields if k in record}
        return {"latent_mean": record["latent_mean"], "latent_std": record["latent_std"],
                "time_ids": record["time_ids"], **caption, "skipped": np.int32(0)}

    return preprocess
