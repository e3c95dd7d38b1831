"""Aspect-ratio bucketing, for fine-tuning on images of mixed shapes: each global batch comes from one bucket
(a (height, width) of about data.resolution**2 pixels, sides a multiple of data.bucket_step), so images are
cropped much less than by a square centre crop.

Still a pure function of (seed, step): every epoch, each bucket's records are shuffled and cut into global
batches (a bucket's remainder waits for the next epoch's shuffle) and the batches are shuffled; step
`s` is batch `s mod n` of epoch `s // n`. Every host computes the same plan and reads its contiguous part of
the batch. Batches of different buckets have different shapes: the step compiles once per bucket.

Assigning records to buckets needs every image's size: `record_sizes` reads each record once at startup,
meant for fine-tuning sets (thousands of images), not web-scale ones.
"""

from __future__ import annotations

import concurrent.futures
import functools
import math
import sys

import grain
import numpy as np

from sdjax.data.records import RECORD_ERRORS, DataError, image_size


def bucket_sizes(resolution: int, step: int, max_aspect: float) -> list[tuple[int, int]]:
    """(height, width) pairs, sides multiples of `step`, area at most resolution**2, aspect <= max_aspect."""
    area = resolution * resolution
    narrowest = step * math.ceil(resolution / math.sqrt(max_aspect) / step)
    sizes = set()
    for width in range(narrowest, int(resolution * math.sqrt(max_aspect)) + 1, step):
        height = area // width // step * step  # the most pixels that fit: every bucket costs about the same
        if height >= step and max(width / height, height / width) <= max_aspect:
            sizes |= {(height, width), (width, height)}
    return sorted(sizes, key=lambda hw: hw[1] / hw[0])


def nearest_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> int:
    """The bucket whose aspect ratio is closest (in log space: 2:1 and 1:2 are equally far from 1:1)."""
    ratios = np.log([w / h for h, w in buckets])
    return int(np.argmin(np.abs(ratios - math.log(width / height))))


def _image_size(source, index: int) -> tuple[int, int] | None:
    try:
        return image_size(source[index]["image"])
    except RECORD_ERRORS:
        return None


def record_sizes(source) -> list[tuple[int, int] | None]:
    """(width, height) of every record's image, None for records that cannot be read (they are substituted
    when asked for, like everywhere else)."""
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        return list(pool.map(functools.partial(_image_size, source), range(len(source))))


class BucketPlan:
    """Global batch `step` -> (bucket (height, width), record indices), deterministic from the seed."""

    def __init__(self, bucket_of_record: np.ndarray, buckets: list[tuple[int, int]], batch_size: int, seed: int):
        self.buckets, self.batch_size, self.seed = buckets, batch_size, seed
        self.members = [np.flatnonzero(bucket_of_record == b) for b in range(len(buckets))]
        self.batches_per_epoch = sum(len(m) // batch_size for m in self.members)
        if not self.batches_per_epoch:
            counts = {f"{h}x{w}": len(m) for (h, w), m in zip(buckets, self.members) if len(m)}
            raise DataError(f"no aspect-ratio bucket holds a full global batch of {batch_size} records "
                            f"(records per bucket: {counts}); lower train.batch_size or set data.aspect_buckets=False.")

    @functools.lru_cache(maxsize=2)
    def _epoch(self, epoch: int) -> list[tuple[int, np.ndarray]]:
        rng = np.random.default_rng([self.seed, epoch])
        batches = []
        for bucket, members in enumerate(self.members):
            shuffled = rng.permutation(members)
            full = len(shuffled) // self.batch_size * self.batch_size
            batches += [(bucket, chunk) for chunk in np.split(shuffled[:full], full // self.batch_size)]
        return [batches[i] for i in rng.permutation(len(batches))]

    def __call__(self, step: int) -> tuple[tuple[int, int], np.ndarray]:
        epoch, position = divmod(step, self.batches_per_epoch)
        bucket, indices = self._epoch(epoch)[position]
        return self.buckets[bucket], indices


def make_bucketed_dataset(records, preprocess, config, process_index: int, process_count: int) -> grain.MapDataset:
    """Item `step` is this host's slice of global batch `step`, all of one bucket.

    `records` is a CheckedSource (read(index, target_hw) substitutes bad records); `preprocess` is
    (record, rng, size) -> model inputs.
    """
    data, seed = config.data, config.train.seed
    buckets = bucket_sizes(data.resolution, data.bucket_step, data.bucket_max_aspect)
    square = nearest_bucket(1, 1, buckets)
    bucket_of_record = np.asarray([square if size is None else nearest_bucket(*size, buckets)
                                   for size in record_sizes(records.source)])
    plan = BucketPlan(bucket_of_record, buckets, config.train.batch_size, seed)
    per_host = config.train.batch_size // process_count

    def host_batch(step: int) -> dict:
        size, indices = plan(step)
        examples = []
        for position in range(process_index * per_host, (process_index + 1) * per_host):
            rng = np.random.default_rng([seed, step, position])  # like grain's per-element rng: any topology
            examples.append(preprocess(records.read(int(indices[position]), size), rng, size))
        return {key: np.stack([e[key] for e in examples]) for key in examples[0]}

    return grain.MapDataset.range(sys.maxsize).map(host_batch)
