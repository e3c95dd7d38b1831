"""Input-pipeline throughput: images/s of decode + augment + tokenize for 512 px JPEGs, per CPU core, on one
thread, with grain threads and with worker processes, beside the images/s the train step consumes.

    python benchmarks/data_throughput.py [--tokenizer DIR] [--images 96] [--config configs/demo.py]

It writes `--images` photo-like JPEGs (shorter side 512, aspect 1:1 to 3:2, quality 90) with LAION-length
captions into a temporary image folder and reads them through sdjax's imagefolder pipeline at
data.resolution=512 with random crop, flip and caption dropout. `--tokenizer` is a CLIPTokenizer folder (a
pretrained model's `tokenizer/`); without it the built-in small-vocabulary tokenizer is used. The step is
`--config`'s model at its own data.resolution on this machine's devices (the pipeline is measured at
512 px and at that resolution).

    python benchmarks/data_throughput.py --webdataset --gcs [--shards 4] [--skip-step]

`--webdataset` packs the same JPEGs into img2dataset-style `.tar` shards and reads them through the
webdataset source instead; `--gcs` also reads the same files from a bucket (a copy in a local
fake-gcs-server started here, tests/gcs_server.py, or `--gcs-bucket gs://...` with real credentials), and adds
the time to build the shards' member index (no index cache) from each place. The local server answers in
~1 ms, so it measures what gs:// costs sdjax's reader (a ranged GET per member through gcsfs) rather than a
real bucket's latency (~10-50 ms per GET, hidden by grain's threads).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tarfile
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


def write_shards(folder: str, num_shards: int) -> str:
    """Packs the image folder's JPEGs and captions into `num_shards` webdataset shards in `folder`/shards;
    their brace pattern."""
    with open(os.path.join(folder, "metadata.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    os.makedirs(os.path.join(folder, "shards"))
    for shard in range(num_shards):
        with tarfile.open(os.path.join(folder, "shards", f"{shard:05d}.tar"), "w") as tar:
            for row in rows[shard::num_shards]:
                key = os.path.splitext(row["file_name"])[0]
                with open(os.path.join(folder, row["file_name"]), "rb") as f:
                    image = f.read()
                for name, payload in ((f"{key}.jpg", image), (f"{key}.txt", row["text"].encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return os.path.join(folder, "shards", f"{{00000..{num_shards - 1:05d}}}.tar")


def gcs_copy(folder: str, bucket: str) -> tuple[str, object]:
    """(gs:// URL of a copy of `folder`, the GCS server started for it or None). Without `bucket`, starts a
    fake-gcs-server on 127.0.0.1 (tests/gcs_server.py) and makes a bucket in it."""
    import fsspec

    server = None
    if not bucket:
        sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
        from gcs_server import GcsServer

        server = GcsServer()
        bucket = server.make_bucket("sdjax-benchmark")
    url = f"{bucket.rstrip('/')}/data-throughput-{os.getpid()}"
    fsspec.filesystem("gs").put(f"{folder}/", url.removeprefix("gs://"), recursive=True)
    return url, server


def index_seconds(pattern: str) -> float:
    """Seconds to expand `pattern` and build every shard's member index (no cache)."""
    from sdjax.data.webdataset import WebDatasetSource

    start = time.perf_counter()
    WebDatasetSource(pattern, index_cache_dir="")
    return time.perf_counter() - start


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
    parser.add_argument("--webdataset", action="store_true", help="read .tar shards instead of an image folder")
    parser.add_argument("--shards", type=int, default=4, help="with --webdataset: how many shards")
    parser.add_argument("--gcs", action="store_true", help="also read the same data from a gs:// bucket")
    parser.add_argument("--gcs-bucket", default="", help="with --gcs: gs://BUCKET[/PREFIX] to copy the data to; "
                        "default: a fake-gcs-server started on 127.0.0.1")
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
        source, path = "imagefolder", folder
        if args.webdataset:
            source, path = "webdataset", write_shards(folder, args.shards)
        places = [("", path)]
        server = None
        if args.gcs:
            url, server = gcs_copy(folder, args.gcs_bucket)
            places.append(("gs:// ", url + path.removeprefix(folder)))
        try:
            for place, place_path in places:
                if source == "webdataset":
                    seconds = index_seconds(place_path)
                    print(f"| - | {place}index of {args.shards} shards, {args.images} records (s) | {seconds:.3f} "
                          "| - |", flush=True)
                for resolution in sorted({512, step_resolution}, reverse=True):
                    config.data.update(source=source, path=place_path, resolution=resolution, random_crop=True,
                                       random_flip=True, caption_dropout=0.1, index_cache_dir="")
                    config.train.batch_size = args.batch_size
                    for label, (value, cores) in pipeline_rates(config, tokenizer, folder, args.images).items():
                        label = f"{place}{source}: {label}" if args.webdataset or args.gcs else label
                        print(f"| {resolution} | {label} | {value:.1f} | {value / cores:.1f} |", flush=True)
        finally:
            if server:
                server.stop()
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
