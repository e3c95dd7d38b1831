"""An SD 1.5-sized training step on one GPU: sdjax's jitted step beside the PyTorch diffusers loop.

By default configs/sd15.py's architecture with random weights (UNet 860M, VAE 84M, CLIP ViT-L/14 text encoder 123M),
512 px images -> 4x64x64 latents, bf16 compute, AdamW over float32 UNet weights, VAE and text encoder frozen
and run every step (no latent cache), same global batch. Each variant runs in its own process, so its peak
GPU memory is its own; a failed variant is reported and the others still run.

    python benchmarks/gpu_train_step.py --batch 8 --repeats 10 --json-out results.json
    python benchmarks/gpu_train_step.py --config configs/demo.py --batch 2 --repeats 1   # a smoke run on CPU

Without a GPU (no CUDA for torch) everything runs on the CPU: only useful to check the script works.

Variants:
  sdjax-KERNEL       sdjax's step with model.attention=KERNEL (sdjax/models/attention.py): `auto` (on GPU:
                     jax.nn.dot_product_attention -> cuDNN flash attention where cuDNN takes the shapes),
                     `default` (diffusers' Flax attention as written: scores materialised), ...
  torch-eager        diffusers' train_text_to_image.py loop, bf16 autocast (PyTorch SDPA attention)
  torch-compile      the same with torch.compile(unet)

Peak memory: JAX's allocator `peak_bytes_in_use`, PyTorch's `torch.cuda.max_memory_allocated()` (both count
the framework's live buffers, not its pool).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import step_runners  # noqa: E402
from sdjax.config import ATTENTIONS, load_config_file  # noqa: E402

VARIANTS = ("sdjax-auto", "torch-eager", "sdjax-default", "torch-compile")  # the default run, in this order


def load_config(path: str, batch: int, attention: str):
    config = load_config_file(path)
    config.train.batch_size = batch
    config.train.precision = "bf16"
    config.model.attention = attention
    config.optimizer.warmup_steps = 0
    config.train.compilation_cache_dir = ""  # no persistent cache: the first step is the compile
    config.train.train_text_encoder = False  # the PyTorch loop trains the UNet alone
    return config


def run_variant(variant: str, config_path: str, batch_size: int, repeats: int) -> dict:
    family, option = variant.split("-", 1)
    config = load_config(config_path, batch_size, option if family == "sdjax" else "default")
    batch = step_runners.fixed_batch(batch_size, config.data.resolution, config.model.text_encoder.vocab_size,
                                     config.data.max_length)
    if family == "sdjax":
        import jax

        from sdjax import roofline
        run_step = step_runners.sdjax_runner(config, batch)
        result = step_runners.time_steps(run_step, repeats)
        stats = jax.devices()[0].memory_stats() or {}
        result["peak_gpu_mib"] = stats.get("peak_bytes_in_use", float("nan")) / 2**20
        result["device"] = jax.devices()[0].device_kind
        # The trainer's own speed report: the median step beside the compiled step's roofline on this device.
        result.update(roofline.measured_against_roofline(result["median_step_s"], *run_step.step_cost,
                                                         jax.devices()[0]))
    else:
        import torch
        device = "cuda" if torch.cuda.is_available() else "cpu"
        run_step = step_runners.torch_runner(config, batch, device=device, precision="bf16",
                                             compile_unet=option == "compile")
        result = step_runners.time_steps(run_step, repeats)
        on_gpu = device == "cuda"
        result["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20 if on_gpu else float("nan")
        result["device"] = torch.cuda.get_device_name() if on_gpu else "cpu"
    return result


def table(results: dict, batch_size: int) -> str:
    def achieved(r: dict) -> str:
        return (f"{r['achieved_tflops_per_device']:.3g}" if "achieved_tflops_per_device" in r else "-") + (
            f" ({100 * r['roofline_fraction']:.0f}%)" if "roofline_fraction" in r else "")

    reference = results.get("torch-eager")
    return step_runners.step_table(
        results, batch_size, reference if reference and "error" not in reference else None, "torch-eager",
        extra=(("peak GPU MiB", lambda r: f"{r['peak_gpu_mib']:.0f}"), ("TFLOP/s (% of roofline)", achieved)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--config", default=os.path.join(ROOT, "configs", "sd15.py"))
    parser.add_argument("--batch", type=int, default=8, help="global batch (one GPU)")
    parser.add_argument("--repeats", type=int, default=10)
    # An SD 1.5 step took over 230 s to its first step on an H200 (init + compile): leave room.
    parser.add_argument("--timeout", type=int, default=480, help="seconds per variant")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--json-out", help="also write the raw results here (rewritten after each variant)")
    parser.add_argument("--log-dir", help="write each variant's stderr to LOG_DIR/VARIANT.log")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_variant(args.child, args.config, args.batch, args.repeats)), flush=True)
        return
    results = {}
    for variant in args.variants.split(","):
        if variant not in VARIANTS and not (variant.startswith("sdjax-") and variant[6:] in ATTENTIONS):
            sys.exit(f"unknown variant {variant!r}; expected torch-eager, torch-compile or sdjax-KERNEL with "
                     f"KERNEL one of {ATTENTIONS}")
        results[variant] = step_runners.run_child(
            [sys.executable, __file__, "--child", variant, "--config", args.config, "--batch", str(args.batch),
             "--repeats", str(args.repeats)], variant, timeout=args.timeout, log_dir=args.log_dir)
        if args.json_out:
            with open(args.json_out, "w") as f:
                json.dump(results, f, indent=2)
    print(table(results, args.batch))


if __name__ == "__main__":
    main()
