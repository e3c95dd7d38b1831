"""Input pipeline: records {image, caption} -> per-host batches {pixel_values, input_ids}.

It knows nothing about the models except the tokenizer. Batches are a pure function of (seed, step):
`dataset[step]` is this host's part of global batch `step`, so resuming at step N needs no iterator state
and every host reads a disjoint, contiguous slice of the same global stream.
"""

from __future__ import annotations

import grain
import ml_collections
import numpy as np
from PIL import Image

from sdjax.data.shapes import ShapesSource

SOURCES = ("demo",)


def make_source(config: ml_collections.ConfigDict, split: str = "train"):
    data = config.data
    if data.source == "demo":
        seed = data.demo_seed if split == "train" else data.demo_seed + 1
        num = data.demo_num_examples if split == "train" else data.demo_num_eval_examples
        return ShapesSource(num_examples=num, resolution=data.resolution, seed=seed)
    raise ValueError(f"data.source={data.source!r} is not one of {SOURCES}.")


# --- preprocessing ops: each takes and returns a record ---------------------------------------------


def resize_and_crop(record: dict, resolution: int, rng: np.random.Generator | None) -> dict:
    """Resizes the shorter side to `resolution`, then centre-crops (or random-crops when `rng` is given)."""
    image = record["image"]
    height, width = image.shape[:2]
    if (height, width) != (resolution, resolution):
        scale = resolution / min(height, width)
        size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
        image = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BICUBIC))
        height, width = image.shape[:2]
        top, left = (height - resolution) // 2, (width - resolution) // 2
        if rng is not None:
            top, left = int(rng.integers(0, height - resolution + 1)), int(rng.integers(0, width - resolution + 1))
        image = image[top:top + resolution, left:left + resolution]
    return {**record, "image": image}


def random_flip(record: dict, rng: np.random.Generator) -> dict:
    if rng.random() < 0.5:
        return {**record, "image": record["image"][:, ::-1]}
    return record


def caption_dropout(record: dict, rate: float, rng: np.random.Generator) -> dict:
    """Replaces the caption with "" at `rate`, so the model also learns the unconditional prediction."""
    if rate > 0 and rng.random() < rate:
        return {**record, "caption": ""}
    return record


def to_model_inputs(record: dict, tokenizer, max_length: int) -> dict:
    pixels = record["image"].astype(np.float32) / 127.5 - 1.0
    ids = tokenizer(record["caption"], padding="max_length", max_length=max_length, truncation=True).input_ids
    return {"pixel_values": pixels, "input_ids": np.asarray(ids, np.int32)}


def make_preprocess(config: ml_collections.ConfigDict, tokenizer, train: bool):
    data = config.data

    def preprocess(record: dict, rng: np.random.Generator) -> dict:
        record = resize_and_crop(record, data.resolution, rng if (train and data.random_crop) else None)
        if train and data.random_flip:
            record = random_flip(record, rng)
        if train:
            record = caption_dropout(record, data.caption_dropout, rng)
        return to_model_inputs(record, tokenizer, data.max_length)

    return preprocess


def make_train_dataset(config: ml_collections.ConfigDict, tokenizer, process_index: int = 0,
                       process_count: int = 1) -> grain.MapDataset:
    """An infinite MapDataset whose item `step` is this host's slice of global batch `step`."""
    per_host_batch = config.train.batch_size // process_count
    preprocess = make_preprocess(config, tokenizer, train=True)
    return (
        grain.MapDataset.source(make_source(config, "train"))
        .seed(config.train.seed)
        .shuffle()
        .repeat()
        .random_map(preprocess)  # before the host split: an example's augmentation is the same on any topology
        .batch(per_host_batch, drop_remainder=True)[process_index::process_count]
    )


def iterate_from(dataset: grain.MapDataset, start_step: int, num_threads: int, prefetch: int):
    """Batches start_step, start_step + 1, ... decoded by `num_threads` threads ahead of the step."""
    return iter(dataset[start_step:].to_iter_dataset(
        grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)))
