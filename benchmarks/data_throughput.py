"""Input-pipeline throughput: images/s of decode + augment + tokenize for 512 px JPEGs, per CPU core, on one
thread, with grain threads and with worker processes, beside the images/s the train step consumes.

    python benchmarks/data_throughput.py [--tokenizer DIR] [--images 96] [--config configs/demo.py]

It writes `--images` photo-like JPEGs (shorter side 512, aspect 1:1 to 3:2, quality 90) with LAION-length
captions into a temporary image folder and reads them through sdjax's imagefolder pipeline at
data.resolution=512 with random crop, flip and caption dropout. `--tokenizer` is a CLIPTokenizer folder (a
pretrained model's `tokenizer/`); without it the built-in small-vocabulary tokenizer is used. The step is
`--config`'s model at its own data.resolution on this machine's devices (the pipeline is measured at
512 px and at that resolution).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np
from PIL import Image

from sdjax import config as config_lib

WORDS = ("a photo of the old red house on hill with trees and blue sky at sunset woman man dog cat walking "
         "street city night painting portrait landscape mountain lake beautiful vintage modern art style by "
         "artist detailed high quality 4k wallpaper black white minimalist colorful abstract").split()


def write_jpegs(folder: str, num: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(num):
        long_side = int(rng.integers(512, 769))
        width, height = (long_side, 512) if i % 2 else (512, long_side)
        # Smooth colour fields plus fine noise: JPEG sizes and decode times like photos (~40-90 KB).
        base = Image.fromarray((rng.random((height // 32, width // 32, 3)) * 255).astype(np.uint8))
        pixels = np.asarray(base.resize((width, height), Image.Resampling.BICUBIC), np.float32)
        pixels += rng.normal(0, 10, pixels.shape)
        name = f"{i:05d}.jpg"
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(os.path.join(folder, name), quality=90)
        rows.append({"file_name": name, "text": " ".join(rng.choice(WORDS, size=int(rng.integers(8, 25))))})
    with open(os.path.join(folder, "metadata.jsonl"), "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)


def rate(fn, count: int) -> float:
    """Items per second of fn() producing `count` items (best of two passes: the first warms caches)."""
    best = float("inf")
    for _ in range(2):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return count / best


def pipeline_rates(config, tokenizer, folder: str, num_images: int) -> dict:
    from sdjax import data as data_lib
    from sdjax.data.preprocess import tokenize
    from sdjax.data.records import CheckedSource

    size = config.data.resolution
    records = CheckedSource(data_lib.make_source(config), (size, size), 0)
    preprocess = data_lib.make_preprocess(config, tokenizer, train=True)
    captions = [records.source[i]["caption"] for i in range(num_images)]
    rng = np.random.default_rng(0)
    results = {  # label -> (images/s, CPU cores it can use)
        "decode (one thread)": (rate(lambda: [records[i] for i in range(num_images)], num_images), 1),
        "tokenize (one thread)": (rate(lambda: [tokenize(tokenizer, c, 77) for c in captions], num_images), 1),
        "decode + augment + tokenize (one thread)":
            (rate(lambda: [preprocess(records[i], rng) for i in range(num_images)], num_images), 1),
    }
    dataset = data_lib.make_train_dataset(config, tokenizer)
    for threads, workers in ((2, 0), (1, 2)):
        label = f"grain, {workers} worker processes x {threads} thread" if workers else f"grain, {threads} threads"
        cores = min(os.cpu_count(), threads * max(workers, 1))
        results[label] = (loader_rate(dataset, threads, workers, num_images // config.train.batch_size), cores)
    return results


def loader_rate(dataset, threads: int, workers: int, num_batches: int) -> float:
    """Images/s of sdjax's loader once running (starting threads or worker processes is not counted)."""
    from sdjax import data as data_lib

    iterator = data_lib.iterate_from(dataset, 0, threads, prefetch=4, num_workers=workers)
    try:
        batch_size = len(next(iterator)["skipped"])
        start = time.perf_counter()
        for _ in range(num_batches):
            next(iterator)
        return num_batches * batch_size / (time.perf_counter() - start)
    finally:
        iterator.close()


def step_rate(config) -> float:
    """Images/s of the compiled train step on this machine (random batches, after compilation)."""
    import jax

    from sdjax import training_setup

    setup = training_setup.build(config)
    state = setup.create_state(jax.random.key(0))
    step = setup.train_step
    size, batch_size = config.data.resolution, config.train.batch_size
    batch = setup.global_batch({"pixel_values": np.zeros((batch_size, size, size, 3), np.float32),
                                "input_ids": np.zeros((batch_size, config.data.max_length), np.int32)})
    state, metrics = step(state, batch, jax.random.key(1))
    jax.block_until_ready(metrics)
    start, steps = time.perf_counter(), 3
    for _ in range(steps):
        state, metrics = step(state, batch, jax.random.key(1))
    jax.block_until_ready(metrics)
    return steps * batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=os.path.join(os.path.dirname(__file__), "..", "configs", "demo.py"))
    parser.add_argument("--tokenizer", default="", help="a CLIPTokenizer folder; default: sdjax's built-in one")
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--skip-step", action="store_true")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]

    from transformers import CLIPTokenizer

    from sdjax.models.tokenizer import builtin_tokenizer

    config = config_lib.load_config_file(args.config)
    step_resolution = config.data.resolution
    tokenizer = CLIPTokenizer.from_pretrained(args.tokenizer) if args.tokenizer else builtin_tokenizer(77)
    print("| resolution | stage | images/s | per core |\n|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        write_jpegs(folder, args.images)
        for resolution in sorted({512, step_resolution}, reverse=True):
            config.data.update(source="imagefolder", path=folder, resolution=resolution, random_crop=True,
                               random_flip=True, caption_dropout=0.1)
            config.train.batch_size = args.batch_size
            for label, (value, cores) in pipeline_rates(config, tokenizer, folder, args.images).items():
                print(f"| {resolution} | {label} | {value:.1f} | {value / cores:.1f} |", flush=True)
    if not args.skip_step:
        import jax
        config = config_lib.load_config_file(args.config)
        config.train.batch_size = args.batch_size
        config.train.precision = "bf16" if jax.default_backend() != "cpu" else "fp32"
        config.mesh.data, config.mesh.fsdp = -1, 1
        print(f"| {step_resolution} | train step of {os.path.basename(args.config)}, batch {args.batch_size}, "
              f"{jax.device_count()} {jax.default_backend()} device(s) | {step_rate(config):.1f} | - |")
    print(f"\n{os.cpu_count()} CPU cores; 1-minute load average before: {load_before:.1f}, after: "
          f"{os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
