"""`data.source` -> a random-access source of raw {image, caption} records (see records.py)."""

from __future__ import annotations

import ml_collections

import sdjax.data.files as files
from sdjax.data.imagefolder import ImageFolderSource
from sdjax.data.records import DataError
from sdjax.data.shapes import ShapesSource
from sdjax.data.tfds_source import TfdsSource
from sdjax.data.webdataset import WebDatasetSource

SOURCES = ("demo", "imagefolder", "webdataset", "tfds", "auto")


def resolved_source(config: ml_collections.ConfigDict) -> str:
    """The concrete source that `data.source` names; "auto" (the demo config's) is read off `data.path` alone:
    no path: the demo; .tar shards (a file, brace pattern, glob, or folder of them): webdataset; another
    folder: imagefolder; the same for gs:// paths. So `--config.data.path=DIR` is the one override that points
    the demo at your data.
    Pure: the code that builds a run writes the answer into its config once (sdjax/run_config.py)."""
    data = config.data
    if data.source != "auto":
        return data.source
    path = data.path
    if not path:
        return "demo"
    if ".tar" in path:  # a shard, pattern or list of them: no need to look
        return "webdataset"
    if files.isdir(path):
        return "webdataset" if files.glob(files.join(path.rstrip("/"), "*.tar")) else "imagefolder"
    raise DataError(f"data.source='auto' cannot tell what data.path={path!r} is (no such folder): expected a "
                    "local or gs:// folder of images "
                    "with metadata.jsonl/.csv (imagefolder) or .tar shards (webdataset); for TFDS set "
                    "data.source=tfds.")


def has_eval_split(config: ml_collections.ConfigDict) -> bool:
    """Whether make_source(config, "eval") has held-out data to read: the demo's own eval split,
    data.eval_path (imagefolder, webdataset) or data.eval_split (tfds); DreamBooth has none."""
    data = config.data
    if config.get("dreambooth") and config.dreambooth.instance_data_dir:
        return False
    source = resolved_source(config)
    return source == "demo" or bool(data.eval_split if source == "tfds" else data.eval_path)


def held_out_key(config: ml_collections.ConfigDict) -> str:
    """The config key that names a source's held-out data."""
    return "data.eval_split" if resolved_source(config) == "tfds" else "data.eval_path"


def make_source(config: ml_collections.ConfigDict, split: str = "train"):
    """The training data (`split="train"`) or the held-out data (`"eval"`: data.eval_path, data.eval_split)."""
    data = config.data
    source = resolved_source(config)
    if split not in ("train", "eval"):
        raise ValueError(f"split={split!r}: expected 'train' or 'eval'")
    if source == "demo":
        seed = data.demo_seed if split == "train" else data.demo_seed + 1
        num = data.demo_num_examples if split == "train" else data.demo_num_eval_examples
        held_out = data.get("demo_held_out", ()) if split == "train" else ()  # the eval split keeps every caption
        return ShapesSource(num_examples=num, resolution=data.resolution, seed=seed, held_out=held_out)
    if split == "eval" and not has_eval_split(config):
        raise DataError(f"data.source={source!r} has no held-out data: set {held_out_key(config)}.")
    key = "data.eval_path" if split == "eval" and source != "tfds" else "data.path"
    path = data.eval_path if key == "data.eval_path" else data.path
    if source == "imagefolder":
        return ImageFolderSource(path, data.caption_column, key)
    if source == "webdataset":
        return WebDatasetSource(path, data.index_cache_dir, key)
    if source == "tfds":
        tfds_split = data.eval_split if split == "eval" else data.split
        return TfdsSource(path, tfds_split, data.tfds_data_dir, data.image_column, data.caption_column)
    raise DataError(f"data.source={source!r} is not one of {SOURCES}.")


def source_name(config: ml_collections.ConfigDict) -> str:
    """How messages name the configured data: the source and its path."""
    data = config.data
    return f"data.source={data.source!r}" + (f" data.path={data.path!r}" if data.path else "")
