"""Steady-state train-step speed of sdjax beside the training loops users would otherwise pick.

Same models (UNet block_out_channels (64, 128, 128), 1 layer per block, cross-attention dim 128; a small VAE
with 2x downsampling; a 2-layer CLIP text encoder of width 128), same 64 px images -> 4x32x32 latents, same
global batch, AdamW, frozen VAE and text encoder, UNet trained. Each variant runs in its own process
(so peak RSS is its own) and reports compile/first-step time and the median of `--repeats` timed steps.

    python benchmarks/train_step.py                      # every variant, then the table
    python benchmarks/train_step.py --variants sdjax-fp32-1dev,torch-fp32 --repeats 5

Variants:
  sdjax-{fp32,bf16}-{1dev,8dev}  sdjax's jitted, sharded step (8dev: 8 emulated CPU devices, mesh data=8)
  flax-example-{fp32,bf16}        the step as diffusers' examples/text_to_image/train_text_to_image_flax.py
                                  writes it: jax.pmap over replicated flax TrainState, optax AdamW with
                                  clipping, frozen VAE/text encoder params passed in, lax.pmean of grads
  torch-{fp32,bf16}               the loop of diffusers' examples/text_to_image/train_text_to_image.py:
                                  UNet2DConditionModel, AutoencoderKL, CLIPTextModel, torch.optim.AdamW,
                                  DDPMScheduler.add_noise, MSE (bf16: torch.autocast on CPU)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import numpy as np

BATCH = 8
IMAGE = 64
UNET = dict(sample_size=32, in_channels=4, out_channels=4, block_out_channels=(64, 128, 128), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=128, attention_head_dim=8)
VAE = dict(in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1, latent_channels=4,
           down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
           norm_num_groups=32, sample_size=IMAGE, scaling_factor=0.18215)
TEXT = dict(vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=77, projection_dim=128)
VARIANTS = ("sdjax-fp32-1dev", "sdjax-bf16-1dev", "sdjax-fp32-8dev", "sdjax-bf16-8dev",
            "flax-example-fp32", "flax-example-bf16", "torch-fp32", "torch-bf16")


def fixed_batch():
    rng = np.random.default_rng(0)
    return {"pixel_values": rng.uniform(-1, 1, (BATCH, IMAGE, IMAGE, 3)).astype(np.float32),
            "input_ids": rng.integers(0, TEXT["vocab_size"], (BATCH, 77)).astype(np.int32)}


def benchmark_config(precision: str):
    from sdjax.config import base_config
    c = base_config()
    c.model.unet.update(**UNET)
    c.model.vae.update(**VAE)
    c.model.text_encoder.update(**TEXT)
    c.data.resolution = IMAGE
    c.train.batch_size = BATCH
    c.train.precision = precision
    c.train.steps = 1000
    c.optimizer.warmup_steps = 0
    return c


def time_steps(run_step, repeats: int) -> dict:
    start = time.perf_counter()
    run_step()
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run_step()
        times.append(time.perf_counter() - start)
    return {"first_step_s": first, "median_step_s": statistics.median(times),
            "spread_s": max(times) - min(times)}


def run_sdjax(precision: str, repeats: int) -> dict:
    import jax

    from sdjax import mesh as mesh_lib
    from sdjax import models as models_lib
    from sdjax import optim
    from sdjax import step as step_lib

    config = benchmark_config(precision)
    models = models_lib.build_models(config)
    mesh = mesh_lib.make_mesh(config)
    tx = optim.make_optimizer(config)
    state, shardings = step_lib.create_train_state(models, config, tx, mesh, jax.random.key(0))
    step = step_lib.jit_train_step(
        step_lib.make_train_step(models, config, tx, optim.make_lr_schedule(config)), shardings, mesh)
    batch = jax.device_put(fixed_batch(), mesh_lib.batch_sharding(mesh))
    rng = jax.random.key(1)
    box = {"state": state}

    def run_step():
        box["state"], metrics = step(box["state"], batch, rng)
        jax.block_until_ready(metrics)

    return time_steps(run_step, repeats)


def run_flax_example(precision: str, repeats: int) -> dict:
    """Mirrors train_text_to_image_flax.py's train_step and its pmap/replicate/shard structure."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import jax_utils
    from flax.training import train_state
    from flax.training.common_utils import shard

    from sdjax import models as models_lib
    from sdjax.models import noise as noise_lib

    config = benchmark_config(precision)
    models = models_lib.build_models(config)
    params = models_lib.init_params(models, config, jax.random.key(0))
    noise_scheduler, noise_scheduler_state = noise_lib.make_noise_scheduler(config)
    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(1e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-2))
    state = train_state.TrainState.create(apply_fn=models.unet.__call__, params=params["unet"], tx=tx)
    text_encoder_params, vae_params = params["text_encoder"], params["vae"]

    def train_step(state, text_encoder_params, vae_params, batch, train_rng):
        dropout_rng, sample_rng, new_train_rng = jax.random.split(train_rng, 3)

        def compute_loss(params):
            vae_outputs = models.vae.apply({"params": vae_params}, jnp.transpose(batch["pixel_values"], (0, 3, 1, 2)),
                                           deterministic=True, method=models.vae.encode)
            latents = vae_outputs.latent_dist.sample(sample_rng)
            latents = jnp.transpose(latents, (0, 3, 1, 2)) * models.vae_scaling_factor
            noise_rng, timestep_rng = jax.random.split(sample_rng)
            noise = jax.random.normal(noise_rng, latents.shape)
            timesteps = jax.random.randint(timestep_rng, (latents.shape[0],), 0, 1000)
            noisy_latents = noise_scheduler.add_noise(noise_scheduler_state, latents, noise, timesteps)
            encoder_hidden_states = models_lib.encode_text(models, text_encoder_params, batch["input_ids"])
            model_pred = models.unet.apply({"params": params}, noisy_latents, timesteps, encoder_hidden_states,
                                           train=True).sample
            return ((noise - model_pred) ** 2).mean()

        loss, grad = jax.value_and_grad(compute_loss)(state.params)
        grad = jax.lax.pmean(grad, "batch")
        new_state = state.apply_gradients(grads=grad)
        metrics = jax.lax.pmean({"loss": loss}, axis_name="batch")
        return new_state, metrics, new_train_rng

    p_train_step = jax.pmap(train_step, "batch", donate_argnums=(0,))
    state = jax_utils.replicate(state)
    text_encoder_params = jax_utils.replicate(text_encoder_params)
    vae_params = jax_utils.replicate(vae_params)
    train_rngs = jax.random.split(jax.random.PRNGKey(0), jax.local_device_count())
    batch = shard(fixed_batch())
    box = {"state": state, "rngs": train_rngs}

    def run_step():
        box["state"], metrics, box["rngs"] = p_train_step(box["state"], text_encoder_params, vae_params, batch,
                                                         box["rngs"])
        jax.block_until_ready(metrics)

    return time_steps(run_step, repeats)


def run_torch(precision: str, repeats: int) -> dict:
    """Mirrors the PyTorch train_text_to_image.py loop body on CPU."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**UNET).train()
    vae = AutoencoderKL(**VAE).eval().requires_grad_(False)
    text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT)).eval().requires_grad_(False)
    noise_scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                                    beta_end=0.012)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    data = fixed_batch()
    pixel_values = torch.from_numpy(data["pixel_values"]).permute(0, 3, 1, 2).contiguous()
    input_ids = torch.from_numpy(data["input_ids"]).long()

    def run_step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            with torch.no_grad():
                latents = vae.encode(pixel_values).latent_dist.sample() * vae.config.scaling_factor
                encoder_hidden_states = text_encoder(input_ids, return_dict=False)[0]
            noise = torch.randn_like(latents)
            timesteps = torch.randint(0, 1000, (latents.shape[0],)).long()
            noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
            model_pred = unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(model_pred.float(), noise.float(), reduction="mean")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()

    return time_steps(run_step, repeats)


def run_variant(variant: str, repeats: int) -> dict:
    family, precision = variant.split("-")[0], variant.split("-")[-2 if variant.endswith("dev") else -1]
    if family == "sdjax":
        result = run_sdjax(precision, repeats)
    elif family == "flax":
        result = run_flax_example(precision, repeats)
    else:
        result = run_torch(precision, repeats)
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def child_env(variant: str) -> dict:
    env = dict(os.environ)
    devices = 8 if variant.endswith("8dev") else 1  # the flax example pmaps over the host's (one) CPU device
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}").strip()
    env["JAX_PLATFORMS"] = "cpu"
    return env


def table(results: dict) -> str:
    reference = results.get("sdjax-bf16-1dev") or next(iter(results.values()))
    lines = ["| variant | img/s | steps/s | median step ms (spread) | first step s | peak RSS MiB | "
             "img/s vs sdjax-bf16-1dev |", "|---|---|---|---|---|---|---|"]
    for variant, r in results.items():
        if "error" in r:
            lines.append(f"| {variant} | failed: {r['error'][:80]} | | | | | |")
            continue
        img_s = BATCH / r["median_step_s"]
        ratio = img_s / (BATCH / reference["median_step_s"])
        lines.append(f"| {variant} | {img_s:.1f} | {1 / r['median_step_s']:.2f} | "
                     f"{r['median_step_s'] * 1e3:.0f} ({r['spread_s'] * 1e3:.0f}) | {r['first_step_s']:.1f} | "
                     f"{r['peak_rss_mib']:.0f} | {ratio:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--json-out", help="also write the raw results here")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_variant(args.child, args.repeats)))
        return
    results = {}
    for variant in args.variants.split(","):
        if variant not in VARIANTS:
            sys.exit(f"unknown variant {variant!r}; expected some of {VARIANTS}")
        proc = subprocess.run([sys.executable, __file__, "--child", variant, "--repeats", str(args.repeats)],
                              env=child_env(variant), capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        results[variant] = json.loads(lines[-1]) if proc.returncode == 0 and lines else {
            "error": (proc.stderr.strip().splitlines() or ["no output"])[-1]}
        print(f"{variant}: {results[variant]}", file=sys.stderr, flush=True)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(results, f, indent=2)
    print(table(results))


if __name__ == "__main__":
    main()
