"""The UNet stage's train step on the three inputs a run can feed it: images (the frozen VAE encoder and text
encoder run in the step), a latent cache (the text encoder runs), and a latent cache with text states
(`data.cache_text_states=True`: the UNet alone). FLOPs per step from XLA's cost analysis, and step time.

    python benchmarks/cached_text_states.py                        # the demo model on this host's CPU: measured
    python benchmarks/cached_text_states.py --plan v5e:2x2 --config configs/sd15.py --batch 16
                                                                   # `sdjax plan`'s compile for a TPU topology

The demo runs configs/demo.py's models (from scratch, random weights) with its text encoder frozen, as a cache
with text states requires, on fixed random batches of each input's shapes. `--plan` runs `sdjax plan`'s
`plan_step` for each input; `sdjax plan` needs a `model.pretrained` folder with a latent cache, so a folder with
the config's model configs and no weights is written for it (plan reads no weights).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import step_runners  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INPUTS = ("images", "latent cache", "latent cache + text states")


def input_config(config, name: str, cache: str = "unused-by-the-benchmark"):
    """`config` training on input `name` (a cache's path is not read: the batches are made here)."""
    config = config.copy_and_resolve_references()
    config.train.train_text_encoder = False
    if name != "images":
        config.data.update(latent_cache=cache, random_crop=False, random_flip=False, aspect_buckets=False)
    config.data.cache_text_states = name == "latent cache + text states"
    return config


def fixed_batch(setup) -> dict:
    """Random host arrays of the shapes `sdjax plan` plans the setup's config for (sdjax/plan.py)."""
    import jax
    import ml_dtypes
    import numpy as np

    from sdjax import plan as plan_lib
    rng = np.random.default_rng(0)
    batch = {}
    for key, shape in plan_lib.planned_batch(setup).items():
        if key == "input_ids":
            batch[key] = rng.integers(0, 1000, shape.shape).astype(np.int32)
        else:
            dtype = ml_dtypes.bfloat16 if shape.dtype == jax.numpy.bfloat16 else np.float32
            batch[key] = rng.uniform(0.1, 1, shape.shape).astype(dtype)
    return batch


def measure_on_cpu(config_file: str, batch_size: int | None, repeats: int) -> dict:
    import jax

    from sdjax import config as config_lib
    from sdjax import training_setup
    from sdjax.roofline import executable_cost
    base = config_lib.load_config_file(config_file)
    base.model.vae_config = ""  # the demo's VAE stage: not part of the UNet step
    if batch_size:
        base.train.batch_size = batch_size
    results = {}
    for name in INPUTS:
        setup = training_setup.build(input_config(base, name))
        batch, rng = fixed_batch(setup), jax.random.key(1)
        global_batch = setup.global_batch(batch)
        lowered, compiled = setup.compile(global_batch, rng)
        flops, _ = executable_cost(lowered, compiled, jax.devices())
        state = {"state": setup.create_state(jax.random.key(0))}

        def run_step():
            state["state"], metrics = setup.train_step(state["state"], global_batch, rng)
            jax.block_until_ready(metrics)

        results[name] = {"flops_per_step": flops * len(jax.devices()), **step_runners.time_steps(run_step, repeats)}
        print(name, json.dumps(results[name]), file=sys.stderr, flush=True)
    return results


def write_config_only_folder(config, folder: str) -> None:
    """A diffusers-layout folder with `config`'s model configs and a tokenizer, no weights: enough for `sdjax
    plan` (it builds the models from configs and compiles from shapes)."""
    from sdjax.models import text_encoder_config
    from sdjax.models.tokenizer import builtin_tokenizer
    tokenizer = builtin_tokenizer(config.data.max_length)
    for name, values in (("unet", config.model.unet.to_dict()), ("vae", config.model.vae.to_dict()),
                         ("text_encoder", text_encoder_config(config.model.text_encoder, tokenizer).to_dict())):
        os.makedirs(os.path.join(folder, name), exist_ok=True)
        with open(os.path.join(folder, name, "config.json"), "w") as f:
            json.dump({k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}, f)
    tokenizer.save_pretrained(os.path.join(folder, "tokenizer"))


def plan_for_topology(config_file: str, topology: str, batch_size: int | None, cache_dir: str,
                      inputs: tuple[str, ...] = INPUTS) -> dict:
    from sdjax import config as config_lib
    from sdjax import plan as plan_lib
    base = config_lib.load_config_file(config_file)
    if batch_size:
        base.train.batch_size = batch_size
    folder = tempfile.mkdtemp(prefix="sdjax-config-only-")
    write_config_only_folder(base, folder)
    base.model.pretrained = folder
    results = {}
    for name in inputs:
        plan = plan_lib.plan_step(input_config(base, name, cache="gs://unused/cache"), topology, cache_dir or None)
        results[name] = {"flops_per_step": plan.flops_per_device and plan.flops_per_device * plan.num_devices,
                         "roofline_step_s": plan.roofline_step_s, "total_gib": plan.total_bytes / 2**30,
                         "compile_s": plan.compile_s, "images_per_s_per_device": plan.images_per_s_per_device}
        print(name, json.dumps(results[name]), file=sys.stderr, flush=True)
    return results


def table(results: dict) -> str:
    images = results["images"]["flops_per_step"] if "images" in results else float("nan")
    first = next(iter(results.values()))
    time_key = "median_step_s" if "median_step_s" in first else "roofline_step_s"
    lines = [f"| input | GFLOP/step | vs images | {time_key} |", "|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['flops_per_step'] / 1e9:.1f} | {r['flops_per_step'] / images:.2f} | "
                     f"{r[time_key]:.4f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=os.path.join(ROOT, "configs", "demo.py"))
    parser.add_argument("--batch", type=int, default=None, help="global batch (default: the config's)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--plan", default="", help="a TPU topology: plan the step with `sdjax plan` instead")
    parser.add_argument("--cache_dir", default="", help="--plan: reuse `sdjax plan` compile results from here")
    parser.add_argument("--inputs", default=",".join(INPUTS), help=f"--plan: some of {INPUTS}, in this order")
    args = parser.parse_args()
    if not args.plan:
        from sdjax import libtpu_host
        libtpu_host.quiet_start_up()  # as the `sdjax` command: no libtpu start-up errors on a host without a TPU
    if args.plan:
        results = plan_for_topology(args.config, args.plan, args.batch, args.cache_dir,
                                    tuple(args.inputs.split(",")))
    else:
        results = measure_on_cpu(args.config, args.batch, args.repeats)
    print(table(results))


if __name__ == "__main__":
    main()
