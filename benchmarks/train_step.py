"""Steady-state train-step speed of sdjax beside the training loops users would otherwise pick.

Same models (UNet block_out_channels (64, 128, 128), 1 layer per block, cross-attention dim 128; a small VAE
with 2x downsampling; a 2-layer CLIP text encoder of width 128), same 64 px images -> 4x32x32 latents, same
global batch, AdamW, frozen VAE and text encoder, UNet trained. Each variant runs in its own process
(so peak RSS is its own) and reports compile/first-step time and the median of `--repeats` timed steps.

    python benchmarks/train_step.py                      # every variant, then the table
    python benchmarks/train_step.py --variants sdjax-fp32-1dev,torch-fp32 --repeats 5
    python benchmarks/train_step.py --unet-channels 32,32 --image-size 16 --batch 2 --repeats 1   # a quick check
    python benchmarks/train_step.py --variants sdjax-fp32-1dev --compilation-cache /tmp/xla   # twice: warm start

Variants:
  sdjax-{fp32,bf16}-{1dev,8dev}  sdjax's jitted, sharded step (8dev: 8 emulated CPU devices, mesh data=8)
  flax-example-{fp32,bf16}        the step as diffusers' examples/text_to_image/train_text_to_image_flax.py
                                  writes it: jax.pmap over replicated flax TrainState, optax AdamW with
                                  clipping, frozen VAE/text encoder params passed in, lax.pmean of grads
  torch-{fp32,bf16}               the loop of diffusers' examples/text_to_image/train_text_to_image.py:
                                  UNet2DConditionModel, AutoencoderKL, CLIPTextModel, torch.optim.AdamW,
                                  DDPMScheduler.add_noise, MSE (bf16: torch.autocast on CPU)
  sdjax-noattn-fp32-1dev          only when named: a bound, not a trainer (attention that does no work)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import step_runners  # noqa: E402

BATCH = 8
IMAGE = 64
UNET_CHANNELS = (64, 128, 128)  # per level; unet_levels() gives the block types
UNET = dict(sample_size=32, in_channels=4, out_channels=4, layers_per_block=1, cross_attention_dim=128,
            attention_head_dim=8)
VAE = dict(in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1, latent_channels=4,
           down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
           norm_num_groups=32, sample_size=IMAGE, scaling_factor=0.18215)
TEXT = dict(vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=77, projection_dim=128)
VARIANTS = ("sdjax-fp32-1dev", "sdjax-bf16-1dev", "sdjax-fp32-8dev", "sdjax-bf16-8dev",
            "flax-example-fp32", "flax-example-bf16", "torch-fp32", "torch-bf16")
# Not a trainer, a bound (run it with --variants): sdjax's step with every UNet attention kernel replaced by
# one that returns its query and does no work, i.e. the step time no attention kernel could beat.
ABLATIONS = ("sdjax-noattn-fp32-1dev",)


def unet_levels(channels: tuple[int, ...]) -> dict:
    """UNET's layout with `channels` per level: cross-attention in every level but the lowest."""
    n = len(channels)
    return dict(block_out_channels=channels, down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1))


def benchmark_config(precision: str, batch_size: int = BATCH, image_size: int = IMAGE,
                     unet_channels: tuple[int, ...] = UNET_CHANNELS, compilation_cache: str = ""):
    from sdjax.config import base_config
    c = base_config()
    c.model.unet.update(**{**UNET, **unet_levels(unet_channels), "sample_size": image_size // 2})
    c.model.vae.update(**{**VAE, "sample_size": image_size})
    c.model.text_encoder.update(**TEXT)
    c.data.resolution = image_size
    c.train.batch_size = batch_size
    c.train.precision = precision
    c.train.steps = 1000
    c.optimizer.warmup_steps = 0
    # sdjax variants: XLA's persistent cache, which `sdjax train` keeps by default; off unless asked for, so
    # that every variant compiles its step (a second run with the same cache measures a warm start)
    c.train.compilation_cache_dir = compilation_cache
    return c


def run_variant(variant: str, repeats: int, batch_size: int, image_size: int, unet_channels: tuple[int, ...],
                compilation_cache: str = "") -> dict:
    family, precision = variant.split("-")[0], variant.split("-")[-2 if variant.endswith("dev") else -1]
    if family == "sdjax":  # as the `sdjax` command does: transformers and tensorboardX imported without torch
        from sdjax._torchless import import_without_torch
        import_without_torch()
    config = benchmark_config(precision, batch_size, image_size, unet_channels, compilation_cache)
    batch = step_runners.fixed_batch(batch_size, image_size, TEXT["vocab_size"])
    if "noattn" in variant:
        from sdjax.models import attention
        for name in attention.KERNELS:
            attention.KERNELS[name] = lambda query, key, value, scale: query
    if family == "sdjax":
        run_step = step_runners.sdjax_runner(config, batch)
    elif family == "flax":
        run_step = step_runners.flax_example_runner(config, batch)
    else:
        run_step = step_runners.torch_runner(config, batch, device="cpu", precision=precision)
    result = step_runners.time_steps(run_step, repeats)
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def child_env(variant: str) -> dict:
    env = dict(os.environ)
    devices = 8 if variant.endswith("8dev") else 1  # the flax example pmaps over the host's (one) CPU device
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}").strip()
    env["JAX_PLATFORMS"] = "cpu"
    return env


def table(results: dict, batch_size: int) -> str:
    ok = {variant: r for variant, r in results.items() if "error" not in r}
    sdjax = [r for variant, r in ok.items() if variant.startswith("sdjax") and variant not in ABLATIONS]
    sdjax = sdjax or list(ok.values())
    reference = min(sdjax, key=lambda r: r["median_step_s"]) if sdjax else None
    return step_runners.step_table(
        results, batch_size, reference, "fastest sdjax",
        extra=(("steps/s", lambda r: f"{1 / r['median_step_s']:.2f}"),
               ("peak RSS MiB", lambda r: f"{r['peak_rss_mib']:.0f}")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--batch", type=int, default=BATCH, help="global batch")
    parser.add_argument("--image-size", type=int, default=IMAGE, help="image side; latents are half of it")
    parser.add_argument("--unet-channels", default=",".join(map(str, UNET_CHANNELS)),
                        help="UNet channels per level (multiples of 32), e.g. 32,32 for a quick smoke run")
    parser.add_argument("--compilation-cache", default="",
                        help="sdjax variants: XLA's persistent compilation cache in this folder, as `sdjax train` "
                             "keeps one (train.compilation_cache_dir); run twice to time a warm start")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--json-out", help="also write the raw results here")
    args = parser.parse_args()
    if args.child:
        unet_channels = tuple(int(c) for c in args.unet_channels.split(","))
        print(json.dumps(run_variant(args.child, args.repeats, args.batch, args.image_size, unet_channels,
                                     args.compilation_cache)))
        return
    results = {}
    for variant in args.variants.split(","):
        if variant not in VARIANTS + ABLATIONS:
            sys.exit(f"unknown variant {variant!r}; expected some of {VARIANTS + ABLATIONS}")
        results[variant] = step_runners.run_child(
            [sys.executable, __file__, "--child", variant, "--repeats", str(args.repeats), "--batch", str(args.batch),
             "--image-size", str(args.image_size), "--unet-channels", args.unet_channels,
             "--compilation-cache", args.compilation_cache], variant,
            env=child_env(variant))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(results, f, indent=2)
    print(table(results, args.batch))


if __name__ == "__main__":
    main()
