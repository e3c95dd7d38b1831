"""`sdjax cache-latents`: the dataset encoded once by the frozen VAE into a latent cache (its format and
reader: sdjax/data/latent_cache.py), so that training skips the encoder (`data.latent_cache=DIR`).
"""

from __future__ import annotations

import json
import os

import grain
import jax
import ml_collections
import numpy as np
from absl import logging
from array_record.python.array_record_module import ArrayRecordWriter
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sdjax import models as models_lib
from sdjax import run_config
from sdjax import validation
from sdjax.config import ConfigError
from sdjax.data.latent_cache import FORMAT_VERSION, METADATA, cache_settings, serialize_record, shard_name
from sdjax.data.preprocess import resize_and_crop, to_pixels, tokenize
from sdjax.data.records import RECORD_ERRORS, DataError, check_bad_fraction, log_bad_record, usable_record
from sdjax.data.sources import make_source, source_name


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
    for notice in run_config.resolve(config):
        logging.warning("%s", notice)
    validation.validate(config, jax.device_count(), jax.process_count())
    if not config.model.pretrained:
        raise ConfigError("model.pretrained", "", "a latent cache needs a pretrained VAE (a local "
                                     "diffusers-format folder); a from-scratch VAE is not worth caching")
    models = models_lib.build_models(config)
    validation.validate_against_models(config, models)
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
            json.dump({"format": FORMAT_VERSION, "settings": cache_settings(config), "source": source_name(config),
                       "shards": [shard_name(p, process_count) for p in range(process_count)]}, f, indent=2)

    path = os.path.join(out_dir, shard_name(process_index, process_count))
    writer = ArrayRecordWriter(path + ".tmp", "group_size:1")  # group_size 1: cheapest random reads
    written = skipped = 0
    pending: list[dict] = []

    def flush():
        pixels = np.zeros((batch_size, *pending[0]["pixel_values"].shape), np.float32)  # one shape: one compile
        pixels[:len(pending)] = [p["pixel_values"] for p in pending]
        mean, std = (np.asarray(m, np.float32) for m in moments(vae_params, pixels))
        for i, example in enumerate(pending):
            writer.write(serialize_record({"latent_mean": mean[i], "latent_std": std[i],
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
