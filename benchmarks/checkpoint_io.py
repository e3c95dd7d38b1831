"""Checkpoint save and restore times of a run's whole TrainState, on local disk and in a `gs://` bucket.

The state is what `sdjax train --config CONFIG` checkpoints (training_setup.build(config).create_state: the
trainable params, the AdamW moments, the frozen VAE/text encoder, EMA params if train.ema_decay > 0), after
`--train-steps` steps on random batches (a new state's zero moments would compress to nothing), saved and
restored through sdjax's own `sdjax.checkpoint.Checkpoints`, as the training loop does, on the default JAX
devices (JAX_PLATFORMS=cpu: one CPU device). For each target, each repeat writes a fresh checkpoint directory
and measures
  save      how long `Checkpoints.save()` blocks the loop (it returns once the arrays are copied off the
            devices; the write goes on in a background thread),
  commit    from the same start until the save is committed (`save()` + `close()`, which waits for it),
  open      a new `Checkpoints` on that directory (what a resuming run does first: the bucket/write check and
            the listing of its steps),
  restore   `restore_latest()` of the whole state onto the abstract state's shardings (until it is ready),
  size      the checkpoint's bytes (the sum of its files' / objects' sizes).
One untimed save + restore per target comes first (orbax's, tensorstore's and gcsfs' first-use costs). The
first table gives the median of `--repeats`, the second the min-max, `--json-out` every value. The bucket is,
unless `--bucket` names a real one, the test GCS server (fake-gcs-server on 127.0.0.1 keeping objects in
memory: tests/gcs_server.py), so its figures are the client path (gcsfs + tensorstore over local HTTP), not a
real bucket's network latency or throughput.

    JAX_PLATFORMS=cpu python benchmarks/checkpoint_io.py                       # configs/demo.py, 3 repeats
    JAX_PLATFORMS=cpu python benchmarks/checkpoint_io.py --targets local --train-steps 0 --json-out io.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def directory_bytes(path: str) -> int:
    """Sum of the sizes of every file (local) or object (gs://) under `path`."""
    import fsspec
    fs, bare = fsspec.core.url_to_fs(path)
    return int(sum(info["size"] for info in fs.find(bare, detail=True).values()))


def state_bytes(state) -> int:
    import jax
    return int(sum(x.nbytes for x in jax.tree.leaves(state) if hasattr(x, "nbytes")))


def check_equal(saved, restored) -> None:
    import jax
    import numpy as np
    a, b = jax.tree.leaves(saved), jax.tree.leaves(restored)
    assert len(a) == len(b), (len(a), len(b))
    for x, y in zip(a, b):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        assert np.array_equal(np.asarray(x), np.asarray(y)), "restored state differs from the saved one"


def trained_state(setup, state, steps: int):
    """`state` after `steps` train steps on random batches: AdamW's moments (zeros in a new state) and the
    zero-initialised biases then hold values, as in any checkpoint of a run, and compress as little."""
    import jax
    import numpy as np
    rng = np.random.default_rng(0)
    vocab = setup.config.model.text_encoder.vocab_size
    for i in range(steps):
        batch = {}
        for key, spec in setup.abstract_batch().items():
            if np.issubdtype(spec.dtype, np.integer):
                batch[key] = rng.integers(0, vocab, spec.shape).astype(spec.dtype)
            else:
                batch[key] = rng.uniform(-1, 1, spec.shape).astype(spec.dtype)
        state, _ = setup.train_step(state, setup.global_batch(batch), jax.random.key(i))
    return jax.block_until_ready(state)


def one_round(directory: str, step: int, config, setup, state, rng, verify: bool) -> dict:
    """Saves `state` at `step` into a fresh `directory`, then restores it with a new Checkpoints."""
    import jax

    from sdjax.checkpoint import Checkpoints
    checkpoints = Checkpoints(directory, config)  # not timed: the writability probe of a run's start
    start = time.perf_counter()
    checkpoints.save(step, state, rng)
    saved = time.perf_counter()
    checkpoints.close()
    committed = time.perf_counter()
    size = directory_bytes(f"{directory}/{step}")
    start_open = time.perf_counter()
    reader = Checkpoints(directory, config)
    opened = time.perf_counter()
    restored = reader.restore_latest(lambda: setup.abstract_state)
    jax.block_until_ready(restored.state)
    done = time.perf_counter()
    reader.close()
    assert restored.step == step, (restored.step, step)
    if verify:
        check_equal(state, restored.state)
    return {"save_s": saved - start, "commit_s": committed - start, "open_s": opened - start_open,
            "restore_s": done - opened, "bytes": size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=os.path.join(ROOT, "configs", "demo.py"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--targets", default="local,gcs", help="comma-separated: local, gcs")
    parser.add_argument("--local-dir", default="",
                        help="parent of the local checkpoints, kept (default: a tmp dir, deleted at the end)")
    parser.add_argument("--bucket", default="", help="a real gs:// bucket (default: the test GCS server)")
    parser.add_argument("--train-steps", type=int, default=2,
                        help="train steps (random batches) before saving; 0 saves the new state, whose zero "
                             "AdamW moments compress to almost nothing")
    parser.add_argument("--no-verify", action="store_true", help="skip comparing the restored state")
    parser.add_argument("--json-out")
    args = parser.parse_args()
    targets = args.targets.split(",")

    server, bucket = None, args.bucket
    if "gcs" in targets and not bucket:  # first: points gcsfs and tensorstore at it before they are used
        sys.path.insert(0, os.path.join(ROOT, "tests"))
        from gcs_server import GcsServer
        server = GcsServer()
        bucket = server.make_bucket("sdjax-checkpoint-benchmark")

    import jax

    from sdjax import config as config_lib
    from sdjax import run_config, training_setup
    config = config_lib.load_config_file(args.config)
    run_config.resolve(config)  # as `sdjax train` does before building (the checkpoint's meta holds it)
    setup = training_setup.build(config)
    state = jax.block_until_ready(setup.create_state(jax.random.key(config.train.seed)))
    state = trained_state(setup, state, args.train_steps)
    rng = jax.random.key(1)
    devices = jax.devices()
    info = {
        "config": os.path.relpath(os.path.abspath(args.config), ROOT),
        "devices": f"{len(devices)} x {devices[0].platform} ({devices[0].device_kind})",
        "precision": config.train.precision, "frozen_precision": config.train.frozen_precision,
        "ema_decay": config.train.ema_decay, "train_text_encoder": bool(config.train.train_text_encoder),
        "train_steps": args.train_steps, "state_bytes": state_bytes(state),
        "arrays": len(jax.tree.leaves(state)),
        "cpus": os.cpu_count(), "load_average_at_start": os.getloadavg()[0],
    }
    print(json.dumps(info), file=sys.stderr, flush=True)

    local_parent = args.local_dir or tempfile.mkdtemp(prefix="sdjax-checkpoint-io-")
    run_id = uuid.uuid4().hex[:8]
    roots = {"local": os.path.join(local_parent, run_id), "gcs": f"{bucket}/{run_id}"}
    results = {}
    try:
        for target in targets:
            one_round(f"{roots[target]}/warmup", 1, config, setup, state, rng, verify=not args.no_verify)
            rounds = []
            for i in range(args.repeats):
                rounds.append(one_round(f"{roots[target]}/run{i}", 1000 * (i + 1), config, setup, state, rng,
                                        verify=not args.no_verify))
                print(target, json.dumps(rounds[-1]), file=sys.stderr, flush=True)
            results[target] = rounds
    finally:
        if server:
            server.stop()
        if not args.local_dir:
            shutil.rmtree(local_parent, ignore_errors=True)
    info["load_average_at_end"] = os.getloadavg()[0]

    names = {"local": "local disk", "gcs": "gs:// (fake-gcs-server, 127.0.0.1)" if server else bucket}
    print(f"{info['config']}: state after {args.train_steps} train steps, {info['state_bytes'] / 1e6:.1f} MB in "
          f"{info['arrays']} arrays on {info['devices']}; median of {args.repeats}, then min-max")
    keys = ("save_s", "commit_s", "open_s", "restore_s")
    print("| target | `save()` blocks, s | committed, s | open, s | `restore_latest`, s | checkpoint, MB |")
    print("|---|---|---|---|---|---|")
    for target, rounds in results.items():
        medians = [f"{statistics.median(r[k] for r in rounds):.3f}" for k in keys]
        size = statistics.median(r["bytes"] for r in rounds)
        print(f"| {names[target]} | {' | '.join(medians)} | {size / 1e6:.2f} |")
    print()
    print("| target (min-max) | `save()` blocks, s | committed, s | open, s | `restore_latest`, s | checkpoint, MB |")
    print("|---|---|---|---|---|---|")
    for target, rounds in results.items():
        ranges = [f"{min(r[k] for r in rounds):.3f}-{max(r[k] for r in rounds):.3f}" for k in keys]
        sizes = [r["bytes"] / 1e6 for r in rounds]
        print(f"| {names[target]} | {' | '.join(ranges)} | {min(sizes):.2f}-{max(sizes):.2f} |")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"info": info, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
