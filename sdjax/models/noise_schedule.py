"""The noise schedule of the diffusion process (betas, alphas_cumprod) and the forward process of training on it.

The schedule is a fixed table of `num_train_timesteps` values computed once on the host, in numpy, as diffusers'
PyTorch schedulers compute it (our reference): float32 betas from `torch.linspace` or the cosine formula, and
alphas_cumprod = prod(1 - betas) accumulated in float64 and rounded to float32, as `torch.cumprod` does on the
CPU. So it equals PyTorch's bit for bit where torch.linspace rounds with a fused multiply-add (x86 with AVX2);
diffusers' Flax schedule (`jnp.linspace`, a float32 `jnp.cumprod`) is up to ~1e-6 off it.

Training closes over a `NoiseSchedule` (a pytree of one array) and calls the pure functions below: noise the
latents to timestep t, the v-prediction target, the signal-to-noise ratio. The sampling schedulers
(sdjax/models/sampling_schedulers.py) read the same table.
"""

from __future__ import annotations

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
