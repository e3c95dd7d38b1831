"""DreamBooth data: a few images of one subject, all captioned with `dreambooth.instance_prompt`, and with
prior preservation as many class images captioned with `dreambooth.class_prompt`.

With prior preservation a global batch is [B/2 instance examples; B/2 class examples] (diffusers'
train_dreambooth layout): the step weights the second half's loss by `dreambooth.prior_loss_weight`
(sdjax/step.py combine_example_losses). Both halves are drawn from their own shuffled, repeated stream, so
batch `step` is still a pure function of (seed, step). Every host decodes the whole global batch and keeps
its slice: DreamBooth batches are a handful of images, and the halves then stay where the step expects them.

Class images come from the base model itself (sdjax/sample.py `sample_class_images`, with the `sample.*`
settings) when the class folder holds fewer than `dreambooth.num_class_images`, before training starts.
"""

from __future__ import annotations

import os

import grain
import ml_collections
import numpy as np

from sdjax.data.imagefolder import IMAGE_EXTENSIONS
from sdjax.data.preprocess import make_preprocess
from sdjax.data.records import CheckedSource, DataError


def image_files(folder: str) -> list[str]:
    """The images directly in `folder`, sorted (none if it does not exist)."""
    if not os.path.isdir(folder):
        return []
    return sorted(os.path.join(folder, name) for name in os.listdir(folder)
                  if name.lower().endswith(IMAGE_EXTENSIONS))


class PromptedImagesSource:
    """Raw records {image: encoded bytes, caption: `prompt`} of the images in a folder."""

    def __init__(self, folder: str, prompt: str, key: str):
        self.files, self.prompt, self.folder = image_files(folder), prompt, folder
        if not self.files:
            raise DataError(f"{key}={folder!r} holds no images ({', '.join(IMAGE_EXTENSIONS)}).")

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict:
        with open(self.files[index], "rb") as f:
            return {"image": f.read(), "caption": self.prompt}

    def describe(self, index: int) -> str:
        return self.files[index]

    def __repr__(self) -> str:
        return f"PromptedImagesSource({self.folder!r})"


def _stream(source, preprocess, config: ml_collections.ConfigDict, batch_size: int, seed: int) -> grain.MapDataset:
    resolution = config.data.resolution
    records = CheckedSource(source, (resolution, resolution), config.data.min_image_size)
    return (grain.MapDataset.source(records).seed(seed).shuffle().repeat().random_map(preprocess)
            .batch(batch_size, drop_remainder=True))


def make_dataset(config: ml_collections.ConfigDict, tokenizer, process_index: int = 0,
                 process_count: int = 1) -> grain.MapDataset:
    """Item `step` is this host's slice of global batch `step` (see the module doc)."""
    db, batch_size, seed = config.dreambooth, config.train.batch_size, config.train.seed
    preprocess = make_preprocess(config, tokenizer, train=True)
    instance = PromptedImagesSource(db.instance_data_dir, db.instance_prompt, "dreambooth.instance_data_dir")
    if not db.with_prior_preservation:
        return _stream(instance, preprocess, config, batch_size // process_count, seed)[process_index::process_count]
    class_images = PromptedImagesSource(db.class_data_dir, db.class_prompt, "dreambooth.class_data_dir")
    halves = grain.experimental.ZipMapDataset([
        _stream(instance, preprocess, config, batch_size // 2, seed),
        _stream(class_images, preprocess, config, batch_size // 2, seed + 1)])
    per_host = batch_size // process_count

    def host_slice(pair):
        batch = {key: np.concatenate([pair[0][key], pair[1][key]]) for key in pair[0]}
        return {key: value[process_index * per_host:(process_index + 1) * per_host] for key, value in batch.items()}

    return halves.map(host_slice)


def missing_class_images(config: ml_collections.ConfigDict) -> int:
    """How many class images prior preservation still needs generated (0 without it)."""
    db = config.dreambooth
    if not (db.instance_data_dir and db.with_prior_preservation):
        return 0
    return max(db.num_class_images - len(image_files(db.class_data_dir)), 0)
