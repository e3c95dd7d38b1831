"""The latent cache: the dataset encoded once by the frozen VAE, so that training skips the encoder.

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

from sdjax.data.preprocess import caption_index, drops_caption, resize_and_crop, to_pixels, tokenize
from sdjax.data.records import RECORD_ERRORS, DataError, check_bad_fraction, log_bad_record, usable_record
from sdjax.data.sources import make_source, source_name

METADATA = "cache.json"
FORMAT_VERSION = 1
# Settings that change what is cached: training from a cache written with other values would be wrong.
CACHED_SETTINGS = ("resolution", "max_length", "min_image_size", "caption_column")


def shard_name(process_index: int, process_count: int) -> str:
    return f"latents-{process_index:05d}-of-{process_count:05d}.array_record"


def _settings(config: ml_collections.ConfigDict) -> dict:
    return {"model.pretrained": os.path.realpath(config.model.pretrained),
            **{f"data.{key}": config.data[key] for key in CACHED_SETTINGS}}


def _serialize(record: dict) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **record)
    return buffer.getvalue()


def _deserialize(data: bytes) -> dict:
    with np.load(io.BytesIO(data)) as arrays:
        return dict(arrays)


# --- writing ----------------------------------------------------------------------------------------


def _encoder_inputs(config: ml_collections.ConfigDict, tokenizer, source):
    """index -> {pixel_values, input_ids [num_captions, max_length]} of the centre crop, or {bad: reason}."""
    data = config.data
    size = (data.resolution, data.resolution)

    def inputs(index: int) -> dict:
        try:
            record = usable_record(source, index, size, data.min_image_size)
        except RECORD_ERRORS as e:
            return {"bad": log_bad_record(source, index, e)}
        image = resize_and_crop(record, size, rng=None)["image"]
        return {"pixel_values": to_pixels(image),
                "input_ids": np.stack([tokenize(tokenizer, c, data.max_length) for c in record["caption"]])}

    return inputs


def cache_latents(config: ml_collections.ConfigDict, out_dir: str) -> dict:
    """Encodes this process's share of the source (records p, p + P, ...) into its shard of `out_dir`;
    returns {records, skipped, out}. The VAE runs data-parallel over this process's devices."""
    import jax  # the models only here: the reading side (in grain's workers too) stays free of them
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from sdjax import config as config_lib
    from sdjax import models as models_lib

    config_lib.validate(config, jax.device_count(), jax.process_count())
    if not config.model.pretrained:
        raise config_lib.ConfigError("model.pretrained", "", "a latent cache needs a pretrained VAE (a local "
                                     "diffusers-format folder); a from-scratch VAE is not worth caching")
    models = models_lib.build_models(config)
    config_lib.validate_against_models(config, models)
    vae_params = models_lib.load_pretrained_params(models, config, ("vae",))["vae"]

    mesh = Mesh(np.asarray(jax.local_devices()), ("batch",))
    replicated, split = NamedSharding(mesh, PartitionSpec()), NamedSharding(mesh, PartitionSpec("batch"))
    moments = jax.jit(lambda params, pixels: models_lib.image_latent_moments(models, params, pixels),
                      in_shardings=(replicated, split), out_shardings=(split, split))
    vae_params = jax.device_put(vae_params, replicated)
    devices = len(mesh.devices)
    batch_size = -(-max(config.train.batch_size // jax.process_count(), 1) // devices) * devices

    source = make_source(config)
    process_index, process_count = jax.process_index(), jax.process_count()
    examples = iter(grain.MapDataset.range(process_index, len(source), process_count)
                    .map(_encoder_inputs(config, models.tokenizer, source))
                    .to_iter_dataset(grain.ReadOptions(num_threads=config.data.num_threads,
                                                       prefetch_buffer_size=config.data.prefetch * batch_size)))
    os.makedirs(out_dir, exist_ok=True)
    if process_index == 0:
        with open(os.path.join(out_dir, METADATA), "w") as f:
            json.dump({"format": FORMAT_VERSION, "settings": _settings(config), "source": source_name(config),
                       "shards": [shard_name(p, process_count) for p in range(process_count)]}, f, indent=2)

    from array_record.python.array_record_module import ArrayRecordWriter

    path = os.path.join(out_dir, shard_name(process_index, process_count))
    writer = ArrayRecordWriter(path + ".tmp", "group_size:1")  # group_size 1: cheapest random reads
    written = skipped = 0
    pending: list[dict] = []

    def flush():
        pixels = np.zeros((batch_size, *pending[0]["pixel_values"].shape), np.float32)  # one shape: one compile
        pixels[:len(pending)] = [p["pixel_values"] for p in pending]
        mean, std = (np.asarray(m, np.float32) for m in moments(vae_params, pixels))
        for i, example in enumerate(pending):
            writer.write(_serialize({"latent_mean": mean[i], "latent_std": std[i],
                                     "input_ids": example["input_ids"]}))
        pending.clear()

    for example in examples:
        if "bad" in example:
            skipped += 1
            continue
        pending.append(example)
        written += 1
        if len(pending) == batch_size:
            flush()
    if pending:
        flush()
    writer.close()
    os.replace(path + ".tmp", path)  # a shard under its final name is complete
    check_bad_fraction(skipped, written + skipped, config.data.max_bad_fraction, source_name(config))
    if not written:
        raise DataError(f"no usable record in {source_name(config)} ({skipped} bad; the log names them).")
    return {"records": written, "skipped": skipped, "out": out_dir}


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
        expected = _settings(config)
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
        return _deserialize(self.source[index])

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
