"""`data.source` -> a random-access source of raw {image, caption} records (see records.py)."""

from __future__ import annotations

import ml_collections

from sdjax.data.imagefolder import ImageFolderSource
from sdjax.data.records import DataError
from sdjax.data.shapes import ShapesSource
from sdjax.data.tfds_source import TfdsSource
from sdjax.data.webdataset import WebDatasetSource

SOURCES = ("demo", "imagefolder", "webdataset", "tfds", "auto")


def resolve_auto_source(config: ml_collections.ConfigDict) -> None:
    """data.source="auto" (the demo config's) -> a concrete source, in place, from data.path alone:
    no path: the demo; .tar shards (a file, brace pattern, glob, or folder of them): webdataset; another
    folder: imagefolder. So `--config.data.path=DIR` is the one override that points the demo at your data.
    Without held-out data for the chosen source, in-training eval is turned off (with a warning)."""
    import glob
    import os

    from absl import logging

    data = config.data
    if data.source != "auto":
        return
    path = data.path
    if not path:
        data.source = "demo"
        return
    tar_files = glob.glob(os.path.join(path, "*.tar")) if os.path.isdir(path) else []
    if ".tar" in path or tar_files:
        data.source = "webdataset"
    elif os.path.isdir(path):
        data.source = "imagefolder"
    else:
        raise DataError(f"data.source='auto' cannot tell what data.path={path!r} is: expected a folder of images "
                        "with metadata.jsonl/.csv (imagefolder) or .tar shards (webdataset); for TFDS set "
                        "data.source=tfds.")
    if config.train.eval_every and not has_eval_split(config):
        logging.warning("data.path=%r has no held-out split (data.eval_path): in-training eval is off.", path)
        config.train.eval_every = 0


def has_eval_split(config: ml_collections.ConfigDict) -> bool:
    """Whether make_source(config, "eval") has held-out data to read."""
    data = config.data
    return data.source == "demo" or bool(data.eval_split if data.source == "tfds" else data.eval_path)


def make_source(config: ml_collections.ConfigDict, split: str = "train"):
    """The training data (`split="train"`) or the held-out data (`"eval"`: data.eval_path, data.eval_split)."""
    resolve_auto_source(config)
    data = config.data
    if split not in ("train", "eval"):
        raise ValueError(f"split={split!r}: expected 'train' or 'eval'")
    if data.source == "demo":
        seed = data.demo_seed if split == "train" else data.demo_seed + 1
        num = data.demo_num_examples if split == "train" else data.demo_num_eval_examples
        held_out = data.get("demo_held_out", ()) if split == "train" else ()  # the eval split keeps every caption
        return ShapesSource(num_examples=num, resolution=data.resolution, seed=seed, held_out=held_out)
    if split == "eval" and not has_eval_split(config):
        key = "data.eval_split" if data.source == "tfds" else "data.eval_path"
        raise DataError(f"data.source={data.source!r} has no held-out data: set {key}.")
    path = data.eval_path if split == "eval" and data.source != "tfds" else data.path
    if data.source == "imagefolder":
        return ImageFolderSource(path, data.caption_column)
    if data.source == "webdataset":
        return WebDatasetSource(path, data.index_cache_dir)
    if data.source == "tfds":
        tfds_split = data.eval_split if split == "eval" else data.split
        return TfdsSource(path, tfds_split, data.tfds_data_dir, data.image_column, data.caption_column)
    raise DataError(f"data.source={data.source!r} is not one of {SOURCES}.")


def source_name(config: ml_collections.ConfigDict) -> str:
    """How messages name the configured data: the source and its path."""
    data = config.data
    return f"data.source={data.source!r}" + (f" data.path={data.path!r}" if data.path else "")
