"""`sdjax cache-latents`: the dataset encoded once by the frozen VAE (and, with `data.cache_text_states`, the
frozen text encoders) into a latent cache (its format and reader: sdjax/data/latent_cache.py), so that
training skips them (`data.latent_cache=DIR`).

Every process encodes its share of the source (records p, p + P, ...) into its own shard, written to a local
file first (array_record writes local files only) and then moved, or uploaded when DIR is `gs://...`, under
its final name. Process 0 writes `cache.json` last, once every process's shard is in place: a cache cut off
earlier has none, and its reader says so.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Collection

import grain
import jax
import ml_collections
import numpy as np
from absl import logging
from array_record.python.array_record_module import ArrayRecordWriter
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sdjax import mesh as mesh_lib
from sdjax import models as models_lib
from sdjax import run_config
from sdjax import step as step_lib
from sdjax import validation
from sdjax.config import ConfigError
from sdjax.data import files
from sdjax.data.latent_cache import (EMPTY_CAPTION, FORMAT_VERSION, METADATA, cache_settings, model_identities,
                                     serialize_record, shard_name)
from sdjax.data.preprocess import resize_and_crop, to_pixels, tokenize
from sdjax.data.records import RECORD_ERRORS, DataError, check_bad_fraction, log_bad_record, usable_record
from sdjax.data.sources import make_source, source_name


def _encoder_inputs(config: ml_collections.ConfigDict, tokenizer, source):
    """index -> {pixel_values, time_ids, input_ids [num_captions, (2,) max_length]} of the centre crop, or
    {bad: reason}."""
    data = config.data
    size = (data.resolution, data.resolution)

    def inputs(index: int) -> dict:
        try:
            record = usable_record(source, index, size, data.min_image_size)
        except RECORD_ERRORS as e:
            return {"bad": log_bad_record(source, index, e)}
        cropped = resize_and_crop(record, size, rng=None)
        return {"pixel_values": to_pixels(cropped["image"]), "time_ids": cropped["crop"].time_ids(*size),
                "input_ids": np.stack([tokenize(tokenizer, c, data.max_length) for c in record["caption"]])}

    return inputs


class Encoders:
    """The frozen encoders, jitted data-parallel over this process's devices, on fixed-size batches (one
    compile each): VAE moments of images, and the text states of captions as the step would compute them."""

    def __init__(self, models: models_lib.Models, config: ml_collections.ConfigDict, params: dict):
        mesh = Mesh(np.asarray(jax.local_devices()), ("batch",))
        replicated, split = NamedSharding(mesh, PartitionSpec()), NamedSharding(mesh, PartitionSpec("batch"))
        devices = len(mesh.devices)
        self.batch_size = -(-max(config.train.batch_size // jax.process_count(), 1) // devices) * devices
        self.models = models
        self._moments = jax.jit(lambda p, pixels: models_lib.image_latent_moments(models, p, pixels),
                                in_shardings=(replicated, split), out_shardings=(split, split))
        self._text_states = jax.jit(self._conditioning, in_shardings=(replicated, split), out_shardings=split)
        # The state keeps frozen params in train.frozen_precision and the step computes in train.precision: the
        # same here, so the cached states are the ones the step would compute.
        self.params = jax.device_put(jax.tree.map(lambda x: x.astype(step_lib.frozen_dtype(config)), params),
                                     replicated)

    def _conditioning(self, params: dict, input_ids: jax.Array) -> dict:
        conditioning = models_lib.text_conditioning(self.models, params, input_ids)
        states = {"encoder_hidden_states": conditioning["context"]}
        if "text_embeds" in conditioning:
            states["text_embeds"] = conditioning["text_embeds"]
        return states

    def latent_moments(self, pixels: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        padded = np.zeros((self.batch_size, *pixels[0].shape), np.float32)  # one shape: one compile
        padded[:len(pixels)] = pixels
        mean, std = self._moments(self.params["vae"], padded)
        return np.asarray(mean, np.float32)[:len(pixels)], np.asarray(std, np.float32)[:len(pixels)]

    def text_states(self, input_ids: np.ndarray) -> dict[str, np.ndarray]:
        """{encoder_hidden_states [N, L, D], (SDXL) text_embeds [N, P]} of N captions' token ids, in the
        models' compute dtype."""
        chunks = []
        for start in range(0, len(input_ids), self.batch_size):
            chunk = input_ids[start:start + self.batch_size]
            padded = np.concatenate([chunk, np.repeat(chunk[:1], self.batch_size - len(chunk), axis=0)])
            states = self._text_states(self.params, padded)
            chunks.append({k: np.asarray(v)[:len(chunk)] for k, v in states.items()})
        return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}


def _checked_models(config: ml_collections.ConfigDict, out_dir: str,
                    set_by_user: Collection[str] = ()) -> models_lib.Models:
    """The models, after filling in and checking `config` (in place) as the run that will train from this
    cache is: its augmentations that a cache cannot hold (flip, random crop) are turned off."""
    config.data.latent_cache = out_dir
    for notice in run_config.resolve(config, set_by_user):
        logging.warning("%s", notice)
    if not config.model.pretrained:
        raise ConfigError("model.pretrained", "", "a latent cache needs a pretrained VAE (a local "
                                     "diffusers-format folder); a from-scratch VAE is not worth caching")
    validation.validate(config, jax.device_count(), jax.process_count(), mesh_lib.device_slices(jax.devices()))
    config.data.latent_cache = ""  # this run reads the images
    models = models_lib.build_models(config)
    validation.validate_against_models(config, models)
    return models


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def cache_latents(config: ml_collections.ConfigDict, out_dir: str, set_by_user: Collection[str] = ()) -> dict:
    """Encodes this process's share of the source into its shard of `out_dir` (a folder or `gs://...`);
    returns {records, skipped, out, text_states} (this process's counts)."""
    models = _checked_models(config, out_dir, set_by_user)
    text_states = bool(config.data.cache_text_states)
    text_encoders = tuple(c for c in models.components if c.startswith("text_encoder")) if text_states else ()
    encoders = Encoders(models, config, models_lib.load_pretrained_params(models, config, ("vae", *text_encoders)))
    batch_size = encoders.batch_size
    identities = model_identities(config, text_states)  # before the long part: a bad folder fails now

    source = make_source(config)
    process_index, process_count = jax.process_index(), jax.process_count()
    examples = iter(grain.MapDataset.range(process_index, len(source), process_count)
                    .map(_encoder_inputs(config, models.tokenizer, source))
                    .to_iter_dataset(grain.ReadOptions(num_threads=config.data.num_threads,
                                                       prefetch_buffer_size=config.data.prefetch * batch_size)))
    if not files.is_remote(out_dir):
        os.makedirs(out_dir, exist_ok=True)
    if process_index == 0:
        files.remove(files.join(out_dir, METADATA))  # an earlier cache's: this one is complete only once rewritten
        if text_states:
            empty_ids = tokenize(models.tokenizer, "", config.data.max_length)[None]
            empty = {k: v[0] for k, v in encoders.text_states(empty_ids).items()}
            files.write_bytes(files.join(out_dir, EMPTY_CAPTION), serialize_record(empty))
    _sync("latent cache: cache.json removed")

    name = shard_name(process_index, process_count)
    staging = tempfile.mkdtemp(prefix="sdjax-cache-") if files.is_remote(out_dir) else out_dir
    local_path = os.path.join(staging, name + ".tmp")
    writer = ArrayRecordWriter(local_path, "group_size:1")  # group_size 1: cheapest random reads
    written = skipped = 0
    pending: list[dict] = []

    def flush():
        mean, std = encoders.latent_moments([p["pixel_values"] for p in pending])
        if text_states:
            counts = [len(p["input_ids"]) for p in pending]
            states = encoders.text_states(np.concatenate([p["input_ids"] for p in pending]))
            per_example = {k: np.split(v, np.cumsum(counts)[:-1]) for k, v in states.items()}
        for i, example in enumerate(pending):
            record = {"latent_mean": mean[i], "latent_std": std[i], "time_ids": example["time_ids"],
                      "input_ids": example["input_ids"]}
            if text_states:
                record.update({k: v[i] for k, v in per_example.items()})
            writer.write(serialize_record(record))
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
    check_bad_fraction(skipped, written + skipped, config.data.max_bad_fraction, source_name(config))
    if not written:
        raise DataError(f"no usable record in {source_name(config)} ({skipped} bad; the log names them).")
    files.move_into(local_path, files.join(out_dir, name))
    if staging != out_dir:
        shutil.rmtree(staging, ignore_errors=True)

    counts = np.asarray([[written, skipped]])
    if process_count > 1:  # also the barrier: every shard is in place once every process has got here
        counts = np.asarray(multihost_utils.process_allgather(counts[0]))
        # Every host reads records from every shard: the shards must be where all hosts see them.
        seen = [files.exists(files.join(out_dir, shard_name(p, process_count))) for p in range(process_count)]
        seen_by = np.asarray(multihost_utils.process_allgather(np.asarray(seen)))  # [reader, writer]
        if not seen_by.all():
            reader, writer = (int(i) for i in np.argwhere(~seen_by)[0])
            raise DataError(f"--out={out_dir!r} is not shared by the processes of this run: process {reader} does "
                            f"not see the shard process {writer} wrote there. Every host reads every shard when "
                            "training: write the cache to a gs:// bucket (or a folder all hosts mount).")
    if process_index == 0:
        metadata = {"format": FORMAT_VERSION, "source": source_name(config), "text_states": text_states,
                    "settings": cache_settings(config, text_states), "models": identities,
                    "shards": [shard_name(p, process_count) for p in range(process_count)],
                    "shard_records": [int(c[0]) for c in counts], "records": int(counts[:, 0].sum()),
                    "skipped": int(counts[:, 1].sum())}
        files.write_bytes(files.join(out_dir, METADATA), json.dumps(metadata, indent=2).encode())
    _sync("latent cache: cache.json written")
    return {"records": written, "skipped": skipped, "out": out_dir, "text_states": text_states}
