"""The forward (noising) process of training, with diffusers' Flax DDPM scheduler."""

from __future__ import annotations

import jax
import jax.numpy as jnp
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


def snr(state, timesteps: jax.Array) -> jax.Array:
    """Signal-to-noise ratio alpha_bar_t / (1 - alpha_bar_t) of the forward process at `timesteps`."""
    alphas_cumprod = state.common.alphas_cumprod[timesteps]
    return alphas_cumprod / (1.0 - alphas_cumprod)


def min_snr_weights(state, timesteps: jax.Array, gamma: float, prediction_type: str) -> jax.Array:
    """Per-example loss weights of Min-SNR-gamma (Hang et al. 2023), as diffusers' training scripts apply
    them: min(SNR, gamma) / SNR for epsilon prediction, min(SNR, gamma) / (SNR + 1) for v prediction (whose
    MSE is already (SNR + 1) times epsilon's)."""
    ratio = snr(state, timesteps)
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
    from sdjax.models.schedulers import diffusion_config_from_folder
    d = config.diffusion
    if config.model.pretrained and d.schedule_from_pretrained:
        d.update(diffusion_config_from_folder(config.model.pretrained))
    if d.prediction_type_override:
        d.prediction_type = d.prediction_type_override
