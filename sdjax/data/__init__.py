"""Input pipeline: a source's records {image, caption} -> per-host batches {pixel_values, input_ids, skipped}.

It knows nothing about the models except the tokenizer. Batches are a pure function of (seed, step):
`dataset[step]` is this host's part of global batch `step`, so resuming at step N needs no iterator state
(the position saved with a checkpoint is the step), every host reads a disjoint, contiguous slice of the same
global stream, and 1 process x 8 devices reads the same global batches as 2 processes x 4.

A batch follows this path:
  sources.py      data.source -> random-access raw records (imagefolder, webdataset, tfds, demo)
  records.py      decode, check; a bad record is replaced by a deterministic substitute and counted
  preprocess.py   resize + crop, flip, one caption of several, caption dropout, [-1, 1] pixels, token ids
  here            shuffle (per epoch), repeat, batch, host slice; grain threads or worker processes
`buckets.py` replaces the shuffle/batch for aspect-ratio bucketing, `latent_cache.py` the image records by
cached VAE latents, `dreambooth.py` the whole source (instance and class images).

This package reads: what writes data (the latent cache: sdjax/cache_latents.py; DreamBooth's class images:
sdjax/sample.py) lives above it, with the models.
"""

from __future__ import annotations

import grain
import ml_collections
import numpy as np
from absl import flags

from sdjax.data import buckets, dreambooth, latent_cache
from sdjax.data.preprocess import caption_dropout, make_preprocess, random_flip, resize_and_crop, to_model_inputs
from sdjax.data.records import CheckedSource, DataError, check_bad_fraction
from sdjax.data.sources import SOURCES, has_eval_split, held_out_key, make_source, resolved_source, source_name

__all__ = ["SOURCES", "DataError", "caption_dropout", "check_bad_fraction", "has_eval_split", "held_out_key",
           "iterate_from", "make_preprocess", "make_source", "make_train_dataset", "random_flip", "resize_and_crop",
           "resolved_source", "source_name", "to_model_inputs", "unaugmented_batches"]


def make_records(config: ml_collections.ConfigDict, tokenizer):
    """(random-access usable records, their (record, rng) -> model inputs) for training."""
    data = config.data
    if data.latent_cache:
        return (latent_cache.CachedLatentsSource(data.latent_cache, config),
                latent_cache.make_cached_preprocess(config, tokenizer))
    records = CheckedSource(make_source(config, "train"), (data.resolution, data.resolution), data.min_image_size)
    records[0]  # a source with nothing usable fails here, before anything compiles
    return records, make_preprocess(config, tokenizer, train=True)


def make_train_dataset(config: ml_collections.ConfigDict, tokenizer, process_index: int = 0,
                       process_count: int = 1) -> grain.MapDataset:
    """An infinite MapDataset whose item `step` is this host's slice of global batch `step`."""
    if config.dreambooth.instance_data_dir:
        return dreambooth.make_dataset(config, tokenizer, process_index, process_count)
    records, preprocess = make_records(config, tokenizer)
    if config.data.aspect_buckets:
        return buckets.make_bucketed_dataset(records, preprocess, config, process_index, process_count)
    per_host_batch = config.train.batch_size // process_count
    return (
        grain.MapDataset.source(records)
        .seed(config.train.seed)
        .shuffle()  # reshuffled every epoch: the shuffle sees the epoch in the index that repeat() passes on
        .repeat()
        .random_map(preprocess)  # before the host split: an example's augmentation is the same on any topology
        .batch(per_host_batch, drop_remainder=True)[process_index::process_count]
    )


def iterate_from(dataset: grain.MapDataset, start_step: int, num_threads: int, prefetch: int, num_workers: int = 0):
    """Batches start_step, start_step + 1, ... decoded ahead of the step by `num_threads` threads, in each of
    `num_workers` worker processes when > 0 (decoding holds the GIL part of the time; processes do not share it).
    The order is the same either way: workers take batches round-robin."""
    read_options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
    batches = dataset[start_step:].to_iter_dataset(read_options)
    if num_workers:
        if not flags.FLAGS.is_parsed():  # grain's workers read its absl flags; sdjax's CLI parses its own
            flags.FLAGS.mark_as_parsed()
        batches = batches.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=num_workers, per_worker_buffer_size=max(1, prefetch // num_workers)))
    return iter(batches)


def unaugmented_batches(config: ml_collections.ConfigDict, tokenizer, split: str,
                        per_host_batch: int) -> grain.MapDataset:
    """Batches of `split` ("train" or "eval") in order, without augmentation or caption dropout: the same
    every time (held-out losses, reconstruction grids, the VAE's scaling factor). Not split between hosts:
    `mesh.global_batches` gives each process its part of each global batch."""
    records = CheckedSource(make_source(config, split), (config.data.resolution,) * 2, config.data.min_image_size)
    preprocess = make_preprocess(config, tokenizer, train=False)

    def model_inputs(index: int, record: dict) -> dict:
        inputs = preprocess(record, np.random.default_rng(index))  # the rng only picks among several captions
        inputs.pop("skipped", None)
        return inputs

    return grain.MapDataset.source(records).map_with_index(model_inputs).batch(per_host_batch, drop_remainder=True)
