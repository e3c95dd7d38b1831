"""One training step of each contender, as a `run_step()` closure over its own state, and the timer.

Shared by benchmarks/train_step.py (CPU, small models) and benchmarks/gpu_sd15.py (one GPU, SD 1.5 sizes).
Every runner trains the UNet with AdamW (clipped at global norm 1) on the same fixed batch of images in
[-1, 1] and token ids, with the VAE and text encoder frozen, exactly as each trainer's own loop does it.
"""

from __future__ import annotations

import statistics
import sys
import time

import numpy as np


def fixed_batch(batch_size: int, image_size: int, vocab_size: int, max_length: int = 77) -> dict:
    rng = np.random.default_rng(0)
    return {"pixel_values": rng.uniform(-1, 1, (batch_size, image_size, image_size, 3)).astype(np.float32),
            "input_ids": rng.integers(0, vocab_size, (batch_size, max_length)).astype(np.int32)}


def time_steps(run_step, repeats: int) -> dict:
    """First call (compile + step; plus `run_step.compile_s` where the runner compiled ahead of its state, as
    sdjax does), one more untimed call (a pmapped step recompiles once its inputs are the device-sharded
    outputs of the first), then the median and spread of `repeats` steady-state steps."""
    start = time.perf_counter()
    run_step()
    first = time.perf_counter() - start + getattr(run_step, "compile_s", 0.0)
    run_step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run_step()
        times.append(time.perf_counter() - start)
    return {"first_step_s": first, "median_step_s": statistics.median(times),
            "spread_s": max(times) - min(times)}


def sdjax_runner(config, batch: dict):
    """sdjax's own step, as `sdjax train` runs it: built by `training_setup.build` (the config's stage step
    jitted over its mesh, state donated), compiled from the state's shapes before the state is created, the
    compiler's freed heap then returned to the OS."""
    import jax

    from sdjax import train as train_lib
    from sdjax import training_setup

    train_lib.enable_compilation_cache(config.train.compilation_cache_dir)  # "" in a cold run
    setup = training_setup.build(config)
    step = setup.train_step
    rng = jax.random.key(1)
    start = time.perf_counter()
    step_cost = train_lib.compile_step_ahead(setup, batch, rng)
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    state = setup.create_state(jax.random.key(0))
    jax.block_until_ready(state)
    train_lib.release_freed_host_memory()
    print(f"sdjax: step compiled in {compile_s:.1f} s, state initialised in {time.perf_counter() - start:.1f} s",
          file=sys.stderr, flush=True)
    batch = setup.global_batch(batch)
    box = {"state": state}

    def run_step():
        box["state"], metrics = step(box["state"], batch, rng)
        jax.block_until_ready(metrics)

    run_step.compile_s = compile_s
    run_step.step_cost = step_cost  # (FLOPs, bytes accessed) per device of the compiled step
    return run_step


def flax_example_runner(config, batch: dict):
    """The step of diffusers' examples/text_to_image/train_text_to_image_flax.py, with its structure:
    `jax.pmap` over a replicated flax TrainState, optax AdamW with clipping, frozen VAE / text encoder params
    passed in replicated, `lax.pmean` of the gradients. (Models built through sdjax.models, which is where
    the diffusers Flax classes live in this project.)"""
    import jax
    import jax.numpy as jnp
    import optax
    import torch  # noqa: F401  (the example loads its data with torch's DataLoader: its process holds torch)
    from flax import jax_utils
    from flax.training import train_state
    from flax.training.common_utils import shard

    from sdjax import models as models_lib
    from sdjax.models import noise as noise_lib

    models = models_lib.build_models(config)
    params = models_lib.init_params(models, config, jax.random.key(0))
    noise_schedule = noise_lib.make_noise_schedule(config)
    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(1e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-2))
    state = train_state.TrainState.create(apply_fn=models.unet.__call__, params=params["unet"], tx=tx)
    text_encoder_params, vae_params = params["text_encoder"], params["vae"]

    def train_step(state, text_encoder_params, vae_params, batch, train_rng):
        dropout_rng, sample_rng, new_train_rng = jax.random.split(train_rng, 3)

        def compute_loss(params):
            vae_outputs = models.vae.apply({"params": vae_params}, jnp.transpose(batch["pixel_values"], (0, 3, 1, 2)),
                                           method=models.vae.encode)
            latents = vae_outputs.latent_dist.sample(sample_rng)
            latents = jnp.transpose(latents, (0, 3, 1, 2)) * models.vae_scaling_factor
            noise_rng, timestep_rng = jax.random.split(sample_rng)
            noise = jax.random.normal(noise_rng, latents.shape)
            timesteps = jax.random.randint(timestep_rng, (latents.shape[0],), 0, 1000)
            noisy_latents = noise_lib.add_noise(noise_schedule, latents, noise, timesteps)
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
    batch = shard(batch)
    box = {"state": state, "rngs": train_rngs}

    def run_step():
        box["state"], metrics, box["rngs"] = p_train_step(box["state"], text_encoder_params, vae_params, batch,
                                                         box["rngs"])
        jax.block_until_ready(metrics)

    return run_step


def torch_runner(config, batch: dict, device: str = "cpu", precision: str = "fp32", compile_unet: bool = False):
    """The loop body of diffusers' examples/text_to_image/train_text_to_image.py: UNet2DConditionModel in float32
    (mixed precision by autocast), the frozen VAE and CLIPTextModel cast to the mixed-precision dtype on GPU
    (as the example does with `weight_dtype`), torch.optim.AdamW, DDPMScheduler.add_noise, MSE in float32,
    clip_grad_norm_(1.0). `compile_unet`: torch.compile(unet), as the example's users add."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    autocast_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    frozen_dtype = autocast_dtype if device != "cpu" else torch.float32
    unet = UNet2DConditionModel(**config.model.unet.to_dict()).to(device).train()
    vae = AutoencoderKL(**config.model.vae.to_dict()).to(device, frozen_dtype).eval().requires_grad_(False)
    text_encoder = CLIPTextModel(CLIPTextConfig(**config.model.text_encoder.to_dict())).to(device, frozen_dtype)
    text_encoder.eval().requires_grad_(False)
    d = config.diffusion
    noise_scheduler = DDPMScheduler(num_train_timesteps=d.num_train_timesteps, beta_schedule=d.beta_schedule,
                                    beta_start=d.beta_start, beta_end=d.beta_end)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    model = torch.compile(unet) if compile_unet else unet
    pixel_values = torch.from_numpy(batch["pixel_values"]).permute(0, 3, 1, 2).contiguous().to(device, frozen_dtype)
    input_ids = torch.from_numpy(batch["input_ids"]).long().to(device)
    scaling_factor = config.model.vae.scaling_factor

    def run_step():
        with torch.autocast(device.split(":")[0], dtype=autocast_dtype, enabled=precision == "bf16"):
            with torch.no_grad():
                latents = vae.encode(pixel_values).latent_dist.sample() * scaling_factor
                encoder_hidden_states = text_encoder(input_ids, return_dict=False)[0]
            noise = torch.randn_like(latents)
            timesteps = torch.randint(0, d.num_train_timesteps, (latents.shape[0],), device=device).long()
            noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
            model_pred = model(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(model_pred.float(), noise.float(), reduction="mean")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        if device != "cpu":
            torch.cuda.synchronize()
        return loss

    return run_step


def run_child(command: list[str], label: str, env: dict | None = None, timeout: float | None = None,
              log_dir: str | None = None) -> dict:
    """Runs one benchmark variant in its own process (so its peak memory is its own) and returns the JSON
    object it printed last, or {"error": ...} with the end of its stderr; a failure never stops the others."""
    import json
    import os
    import subprocess

    try:
        proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        result = {"error": f"over {timeout} s"}
    else:
        if log_dir:
            with open(os.path.join(log_dir, f"{label}.log"), "w") as f:
                f.write(proc.stderr)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        result = json.loads(lines[-1]) if proc.returncode == 0 and lines else {
            "error": " / ".join(proc.stderr.strip().splitlines()[-3:]) or "no output"}
    print(f"{label}: {result}", file=sys.stderr, flush=True)
    return result


def step_table(results: dict, batch_size: int, reference: dict | None, reference_name: str,
               extra: tuple = ()) -> str:
    """The markdown table of step benchmark results, one row per variant (a failed one says why): img/s,
    median step ms (spread), first step s, then `extra` columns as (header, result -> text), then img/s
    against `reference`'s result (named `reference_name`)."""
    headers = ["variant", "img/s", "median step ms (spread)", "first step s", *(h for h, _ in extra),
               f"img/s vs {reference_name}"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for variant, r in results.items():
        if "error" in r:
            lines.append(f"| {variant} | failed: {r['error'][:100]} |" + " |" * (len(headers) - 2))
            continue
        ratio = f"{reference['median_step_s'] / r['median_step_s']:.2f}x" if reference else "-"
        cells = [variant, f"{batch_size / r['median_step_s']:.1f}",
                 f"{r['median_step_s'] * 1e3:.0f} ({r['spread_s'] * 1e3:.0f})", f"{r['first_step_s']:.1f}",
                 *(cell(r) for _, cell in extra), ratio]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
