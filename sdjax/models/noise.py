"""The forward (noising) process of training, with diffusers' Flax DDPM scheduler."""

from __future__ import annotations

import jax
import ml_collections
from diffusers import FlaxDDPMScheduler


def make_noise_scheduler(config: ml_collections.ConfigDict):
    """(scheduler, state) for `config.diffusion`; state holds the alphas the step closes over."""
    d = config.diffusion
    scheduler = FlaxDDPMScheduler(
        num_train_timesteps=d.num_train_timesteps, beta_start=d.beta_start, beta_end=d.beta_end,
        beta_schedule=d.beta_schedule, prediction_type=d.prediction_type)
    return scheduler, scheduler.create_state()


def add_noise(scheduler, state, latents: jax.Array, noise: jax.Array, timesteps: jax.Array) -> jax.Array:
    return scheduler.add_noise(state, latents, noise, timesteps)


def training_target(scheduler, state, latents, noise, timesteps, prediction_type: str) -> jax.Array:
    """What the UNet must predict: the noise (epsilon) or the velocity v = alpha_t * noise - sigma_t * x0."""
    if prediction_type == "epsilon":
        return noise
    return scheduler.get_velocity(state, latents, noise, timesteps)
