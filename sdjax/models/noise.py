"""The noise schedule of the diffusion process (betas, alphas_cumprod) and the forward process of training on it.

The schedule is a fixed table of `num_train_timesteps` values computed once on the host, in numpy, as diffusers'
PyTorch schedulers compute it (our reference): float32 betas from `torch.linspace` or the cosine formula, and
alphas_cumprod = prod(1 - betas) accumulated in float64 and rounded to float32, as `torch.cumprod` does on the
CPU. So it equals PyTorch's bit for bit where torch.linspace rounds with a fused multiply-add (x86 with AVX2);
diffusers' Flax schedule (`jnp.linspace`, a float32 `jnp.cumprod`) is up to ~1e-6 off it.

Training closes over a `NoiseSchedule` (a pytree of one array) and calls the pure functions below: noise the
latents to timestep t, the v-prediction target, the signal-to-noise ratio and Min-SNR weights, the noise
itself (offset noise, input perturbation). The sampling schedulers (sdjax/models/schedulers.py) read the same
table.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import struct

from sdjax.config import BETA_SCHEDULES

MAX_COSINE_BETA = 0.999  # diffusers' cap on the cosine schedule's betas, which reach 1 at the last timestep


def _torch_linspace_float32(start: float, end: float, num: int) -> np.ndarray:
    """`torch.linspace(start, end, num, dtype=torch.float32)` as torch rounds it: a float32 step, the first half
    counted from `start` and the second from `end`, each value start + i * step rounded once."""
    if num == 1:
        return np.array([start], np.float32)
    start32, end32 = np.float32(start), np.float32(end)
    step = np.float64((end32 - start32) / np.float32(num - 1))
    i = np.arange(num)
    from_start = np.float64(start32) + step * i
    from_end = np.float64(end32) - step * (num - 1 - i)
    return np.where(i < num // 2, from_start, from_end).astype(np.float32)


def betas(diffusion: ml_collections.ConfigDict) -> np.ndarray:
    """beta_t [num_train_timesteps] float32 for `config.diffusion` (its beta_schedule in BETA_SCHEDULES)."""
    num, schedule = diffusion.num_train_timesteps, diffusion.beta_schedule
    if schedule == "linear":
        return _torch_linspace_float32(diffusion.beta_start, diffusion.beta_end, num)
    if schedule == "scaled_linear":  # Stable Diffusion's: linear in sqrt(beta)
        return _torch_linspace_float32(diffusion.beta_start**0.5, diffusion.beta_end**0.5, num) ** 2
    if schedule == "squaredcos_cap_v2":  # Nichol & Dhariwal's cosine alpha_bar; beta_start/end are not used
        t = np.arange(num + 1) / num
        alpha_bar = np.cos((t + 0.008) / 1.008 * np.pi / 2) ** 2
        return np.minimum(1 - alpha_bar[1:] / alpha_bar[:-1], MAX_COSINE_BETA).astype(np.float32)
    raise ValueError(f"diffusion.beta_schedule={schedule!r}: expected one of {list(BETA_SCHEDULES)}")


def alphas_cumprod(diffusion: ml_collections.ConfigDict) -> np.ndarray:
    """alpha_bar_t = prod_{s <= t} (1 - beta_s) [num_train_timesteps] float32: the signal left at timestep t."""
    return np.cumprod(1 - betas(diffusion), dtype=np.float64).astype(np.float32)


@struct.dataclass
class NoiseSchedule:
    """What the training step closes over: alpha_bar_t of every training timestep, on the device."""

    alphas_cumprod: jax.Array  # [num_train_timesteps] float32


def make_noise_schedule(config: ml_collections.ConfigDict) -> NoiseSchedule:
    return NoiseSchedule(jnp.asarray(alphas_cumprod(config.diffusion)))


def _per_example(values: jax.Array, like: jax.Array) -> jax.Array:
    """values [B] (one per timestep) shaped to broadcast over `like` [B, ...], in its dtype."""
    return values.astype(like.dtype).reshape(values.shape + (1,) * (like.ndim - values.ndim))


def add_noise(schedule: NoiseSchedule, latents: jax.Array, noise: jax.Array, timesteps: jax.Array) -> jax.Array:
    """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) noise, example i at timesteps[i]."""
    alpha_bar = schedule.alphas_cumprod[timesteps]
    return _per_example(alpha_bar**0.5, latents) * latents + _per_example((1 - alpha_bar) ** 0.5, latents) * noise


def velocity(schedule: NoiseSchedule, latents: jax.Array, noise: jax.Array, timesteps: jax.Array) -> jax.Array:
    """The v-prediction target v = sqrt(alpha_bar_t) noise - sqrt(1 - alpha_bar_t) x_0 (Salimans & Ho 2022)."""
    alpha_bar = schedule.alphas_cumprod[timesteps]
    return _per_example(alpha_bar**0.5, latents) * noise - _per_example((1 - alpha_bar) ** 0.5, latents) * latents


def snr(schedule: NoiseSchedule, timesteps: jax.Array) -> jax.Array:
    """Signal-to-noise ratio alpha_bar_t / (1 - alpha_bar_t) of the forward process at `timesteps`."""
    alpha_bar = schedule.alphas_cumprod[timesteps]
    return alpha_bar / (1.0 - alpha_bar)


def training_target(schedule: NoiseSchedule, latents, noise, timesteps, prediction_type: str) -> jax.Array:
    """What the UNet must predict: the noise (epsilon) or the velocity (`velocity`)."""
    if prediction_type == "epsilon":
        return noise
    return velocity(schedule, latents, noise, timesteps)


def min_snr_weights(schedule: NoiseSchedule, timesteps: jax.Array, gamma: float, prediction_type: str) -> jax.Array:
    """Per-example loss weights of Min-SNR-gamma (Hang et al. 2023), as diffusers' training scripts apply
    them: min(SNR, gamma) / SNR for epsilon prediction, min(SNR, gamma) / (SNR + 1) for v prediction (whose
    MSE is already (SNR + 1) times epsilon's)."""
    ratio = snr(schedule, timesteps)
    clipped = jnp.minimum(ratio, gamma)
    return clipped / ratio if prediction_type == "epsilon" else clipped / (ratio + 1.0)


def training_noise(rng: jax.Array, shape: tuple[int, ...], noise_offset: float) -> jax.Array:
    """One example's noise [C, H, W]: standard normal, plus `noise_offset` times one more normal per channel
    (constant over H, W) when the offset is > 0. The offset lets the model shift a channel's mean, i.e. make
    images much darker or brighter than average (diffusers' --noise_offset). The base draw comes from `rng`
    alone, so the noise without an offset is the same as before the option existed."""
    noise = jax.random.normal(rng, shape, jnp.float32)
    if noise_offset:
        channel_offsets = jax.random.normal(jax.random.fold_in(rng, 1), (shape[0], 1, 1), jnp.float32)
        noise = noise + noise_offset * channel_offsets
    return noise


def perturbed_noise(rng: jax.Array, noise: jax.Array, input_perturbation: float) -> jax.Array:
    """The noise the inputs are noised with under input perturbation (Ning et al. 2023, diffusers'
    --input_perturbation): noise + gamma * a fresh normal draw; the target stays `noise`."""
    if not input_perturbation:
        return noise
    return noise + input_perturbation * jax.random.normal(jax.random.fold_in(rng, 2), noise.shape, jnp.float32)


def resolve_noise_schedule(config: ml_collections.ConfigDict) -> None:
    """In place, before training: with `model.pretrained` (and `diffusion.schedule_from_pretrained`) the
    noise schedule and prediction type of its scheduler/scheduler_config.json, as diffusers' scripts take
    them; then `diffusion.prediction_type_override` if set (e.g. "v_prediction" to fine-tune SD 2.x 768 from a
    folder whose scheduler config says otherwise, diffusers' --prediction_type)."""
    d = config.diffusion
    if config.model.pretrained and d.schedule_from_pretrained:
        d.update(diffusion_config_from_folder(config.model.pretrained))
    if d.prediction_type_override:
        d.prediction_type = d.prediction_type_override


def diffusion_config_from_folder(pretrained_dir: str) -> dict:
    """The noise-schedule keys of `config.diffusion` found in a diffusers folder's scheduler config, if any."""
    path = os.path.join(pretrained_dir, "scheduler", "scheduler_config.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        saved = json.load(f)
    keys = ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "prediction_type")
    return {key: saved[key] for key in keys if key in saved}
